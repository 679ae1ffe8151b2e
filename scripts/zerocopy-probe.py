#!/usr/bin/env python3
"""zerocopy-probe.py: does MSG_ZEROCOPY cut the sender's CPU per GiB here?

  zerocopy-probe.py server ADDR PORT
  zerocopy-probe.py client ADDR PORT SIZE_MIB copy|zerocopy

The client sends SIZE_MIB MiB from a populated memfd mapping (as livemig's
sender sends guest memory), in 256 KiB sendmsg calls, with or without
MSG_ZEROCOPY (reaping completions from the error queue), and prints its CPU
seconds per GiB and how many completions say the kernel copied anyway
(SO_EE_CODE_ZEROCOPY_COPIED: delivery to a local socket, veth included).
The server prints its own CPU seconds per GiB. scripts/bench-zerocopy.sh
runs both across the testbed's veth link.
"""
import mmap, os, resource, select, socket, struct, sys

SO_ZEROCOPY, MSG_ZEROCOPY, MSG_ERRQUEUE = 60, 0x4000000, 0x2000
SO_EE_ORIGIN_ZEROCOPY, SO_EE_CODE_ZEROCOPY_COPIED = 5, 1
CHUNK = 256 << 10


def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def server(addr, port):
    ls = socket.create_server((addr, port))
    print("ready", flush=True)
    s, _ = ls.accept()
    buf, n, c0 = bytearray(1 << 20), 0, cpu()
    while (k := s.recv_into(buf)) > 0:
        n += k
    print(f"receiver {n} bytes, {(cpu() - c0) / (n / 2**30):.3f} CPU s/GiB")


def reap(s, block):
    """Completions as (ranges, copied): each notification covers a range of sends."""
    done = copied = 0
    while True:
        if block and not select.select([], [], [s], 5)[2]:
            break
        try:
            _, anc, _, _ = s.recvmsg(0, 4096, MSG_ERRQUEUE | (0 if block else socket.MSG_DONTWAIT))
        except BlockingIOError:
            break
        for _, _, data in anc:
            # struct sock_extended_err: errno u32, origin u8, type u8, code u8, pad u8, info u32, data u32
            _, origin, _, code, _, lo, hi = struct.unpack("=IBBBBII", data[:16])
            if origin == SO_EE_ORIGIN_ZEROCOPY:
                done += hi - lo + 1
                copied += (hi - lo + 1) if code & SO_EE_CODE_ZEROCOPY_COPIED else 0
        block = False
    return done, copied


def client(addr, port, mib, mode):
    size = mib << 20
    fd = os.memfd_create("zerocopy-probe")
    os.ftruncate(fd, size)
    m = mmap.mmap(fd, size)
    pattern = os.urandom(1 << 20)
    for off in range(0, size, 1 << 20):
        m[off:off + (1 << 20)] = pattern
    view = memoryview(m)
    s = socket.create_connection((addr, port))
    zc = mode == "zerocopy"
    if zc:
        s.setsockopt(socket.SOL_SOCKET, SO_ZEROCOPY, 1)
    sends = done = copied = off = 0
    c0 = cpu()
    while off < size:
        n = s.sendmsg([view[off:off + CHUNK]], [], MSG_ZEROCOPY if zc else 0)
        off += n
        sends += 1
        if zc and sends % 64 == 0:
            d, c = reap(s, False)
            done, copied = done + d, copied + c
    while zc and done < sends:
        d, c = reap(s, True)
        if d == 0:
            break
        done, copied = done + d, copied + c
    used = cpu() - c0
    s.close()
    print(f"sender {mode}: {size} bytes, {used / (size / 2**30):.3f} CPU s/GiB, "
          f"{sends} sends, {done} completions, {copied} copied by the kernel")
    view.release()


if __name__ == "__main__":
    if sys.argv[1] == "server":
        server(sys.argv[2], int(sys.argv[3]))
    else:
        client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
