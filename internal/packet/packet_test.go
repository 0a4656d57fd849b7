package packet

import (
	"net"
	"net/netip"
	"testing"
)

var (
	macA = net.HardwareAddr{0x02, 0, 0, 0, 0, 1}
	macB = net.HardwareAddr{0x02, 0, 0, 0, 0, 2}
	v4A  = netip.MustParseAddr("198.18.0.1")
	v4B  = netip.MustParseAddr("198.18.0.2")
	v6A  = netip.MustParseAddr("fd00::1")
	v6B  = netip.MustParseAddr("fd00::2")
)

func TestDescribe(t *testing.T) {
	eth := &Ethernet{Src: macA, Dst: macB}
	for _, tc := range []struct {
		frame []byte
		want  string
	}{
		{Build(eth, &IPv4{Src: v4A, Dst: v4B}, &TCP{SrcPort: 40000, DstPort: 80, Flags: SYN}), "198.18.0.1:40000 > 198.18.0.2:80 TCP [S]"},
		{Build(eth, &IPv4{Src: v4A, Dst: v4B}, &UDP{SrcPort: 53, DstPort: 5353}, Payload("x")), "198.18.0.1:53 > 198.18.0.2:5353 UDP"},
		{Build(eth, &IPv4{Src: v4A, Dst: v4B}, &ICMP{Type: ICMPEchoRequest}), "198.18.0.1 > 198.18.0.2 ICMP echo request"},
		{Build(eth, &IPv6{Src: v6A, Dst: v6B}, &ICMP{Type: ICMPv6EchoReply}), "fd00::1 > fd00::2 ICMPv6 echo reply"},
		{Build(eth, &IPv6{Src: v6A, Dst: v6B}, &TCP{SrcPort: 1, DstPort: 2, Flags: SYN | ACK}), "[fd00::1]:1 > [fd00::2]:2 TCP [S.]"},
		{Build(eth, &ARP{Op: 1, SenderIP: v4A, TargetIP: v4B}), "ARP who-has 198.18.0.2 tell 198.18.0.1"},
		{Build(eth, &IPv4{Src: v4A, Dst: v4B})[:20], "IPv4 (truncated or malformed)"},
		{[]byte{1, 2, 3}, "truncated frame (3 bytes)"},
	} {
		if got := Describe(tc.frame); got != tc.want {
			t.Errorf("Describe = %q, want %q", got, tc.want)
		}
	}
}

// Checksums verify to zero when summed over the header that carries them.
func TestChecksums(t *testing.T) {
	ip := &IPv4{Src: v4A, Dst: v4B}
	f := Build(&Ethernet{}, ip, &UDP{SrcPort: 1, DstPort: 2}, Payload("hello"))
	if got := checksum(f[14:34], 0); got != 0 {
		t.Errorf("IPv4 header checksum does not verify: %#x", got)
	}
	if got := checksum(f[34:], pseudoSum(ip, ProtoUDP, len(f)-34)); got != 0 {
		t.Errorf("UDP checksum does not verify: %#x", got)
	}
	ip6 := &IPv6{Src: v6A, Dst: v6B}
	f = Build(&Ethernet{}, ip6, &TCP{SrcPort: 1, DstPort: 2}, Payload("odd"))
	if got := checksum(f[54:], pseudoSum(ip6, ProtoTCP, len(f)-54)); got != 0 {
		t.Errorf("TCP/IPv6 checksum does not verify: %#x", got)
	}
}
