package main

//go:generate go tool bpf2go -no-global-types Blacklist arp.c
