/* Fixed-width integer types, as the kernel's UAPI names them. The programs
 * include nothing from the build host: every definition they use is in
 * bpf/include, so an update of a system package cannot change the objects. */
#pragma once

typedef unsigned char __u8;
typedef signed char __s8;
typedef unsigned short __u16;
typedef signed short __s16;
typedef unsigned int __u32;
typedef signed int __s32;
typedef unsigned long long __u64;
typedef signed long long __s64;

/* Network byte order; the names document intent, the compiler sees plain
 * integers. */
typedef __u16 __be16;
typedef __u32 __be32;
typedef __u64 __be64;
typedef __u16 __sum16;
typedef __u32 __wsum;

#define NULL ((void *)0)

#define __always_inline inline __attribute__((always_inline))
#define __noinline __attribute__((noinline))

/* Byte order of constants and fields; folded at compile time. */
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define bpf_htons(x) ((__be16)__builtin_bswap16(x))
#define bpf_htonl(x) ((__be32)__builtin_bswap32(x))
#else
#define bpf_htons(x) ((__be16)(x))
#define bpf_htonl(x) ((__be32)(x))
#endif
#define bpf_ntohs(x) bpf_htons(x)
#define bpf_ntohl(x) bpf_htonl(x)
