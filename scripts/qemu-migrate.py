#!/usr/bin/env python3
"""qemu-migrate.py: one live migration between two QEMUs on this machine.

Used by scripts/compare-qemu.sh. Starts a source QEMU booting the guest
image (scripts/qemu-bootsector.s) and a destination QEMU waiting on
-incoming tcp:127.0.0.1:PORT, both TCG, driven over QMP on UNIX sockets.
Waits until the guest has written every page once (its first 'B' on the
serial port), measures its write rate for --warmup seconds, sets
max-bandwidth and downtime-limit, migrates, polls query-migrate, and
cancels (migrate_cancel) a migration still running after --max-time
seconds. Writes what QEMU reported to --json as one object; a completed
migration counts only once the destination guest has run on (written a
page pass of its own).

Exit status: 0 when the migration completed or was cancelled at the time
limit, 1 on any other failure (one line on stderr says which).
"""
import argparse
import ctypes
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time

# Pages the boot sector writes in one pass: 4 KiB pages in [1 MiB, 100 MiB).
PASS_PAGES = (100 - 1) * 256
POLL_S = 0.05  # query-migrate period
READY_S = 60.0  # longest wait for QEMU or the guest to get ready


class Fail(Exception):
    """A failure that ends the run with one line of explanation."""


class Qemu:
    """A QEMU process, its QMP connection and its serial output file."""

    def __init__(self, name, binary, image, workdir, mem, extra=()):
        self.name = name
        self.qmp_path = os.path.join(workdir, f"{name}.qmp")
        self.serial_path = os.path.join(workdir, f"{name}.serial")
        self.log_path = os.path.join(workdir, f"{name}.log")
        open(self.serial_path, "w").close()
        argv = [binary, "-accel", "tcg", "-m", mem, "-nodefaults", "-display", "none",
                "-serial", f"file:{self.serial_path}",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
                "-drive", f"file={image},format=raw,if=ide,snapshot=on", *extra]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        self.sock = self.file = None

    def check_alive(self):
        if self.proc.poll() is not None:
            with open(self.log_path) as f:
                lines = [ln.strip() for ln in f if ln.strip()]
            why = lines[-1] if lines else "no output"
            raise Fail(f"{self.name} QEMU exited with status {self.proc.returncode}: {why}")

    def connect(self):
        """Connects to QMP once the socket accepts, and leaves the greeting."""
        deadline = time.monotonic() + READY_S
        while True:
            self.check_alive()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.qmp_path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise Fail(f"{self.name} QEMU's QMP socket did not accept within {READY_S:.0f} s")
                time.sleep(0.02)
        sock.settimeout(READY_S)
        self.sock, self.file = sock, sock.makefile("rw")
        greeting = self._read()
        if "QMP" not in greeting:
            raise Fail(f"{self.name} QEMU: unexpected QMP greeting {greeting}")
        self.cmd("qmp_capabilities")
        return greeting["QMP"].get("version", {}).get("qemu", {})

    def _read(self):
        try:
            line = self.file.readline()
        except OSError as e:
            raise Fail(f"{self.name} QEMU's QMP connection failed: {e}") from e
        if not line:
            self.check_alive()
            raise Fail(f"{self.name} QEMU closed its QMP connection")
        return json.loads(line)

    def cmd(self, name, **arguments):
        msg = {"execute": name}
        if arguments:
            msg["arguments"] = arguments
        self.file.write(json.dumps(msg) + "\n")
        self.file.flush()
        while True:
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise Fail(f"{self.name} QEMU refused {name}: {reply['error'].get('desc')}")
            # Otherwise an asynchronous event: not the reply.

    def passes(self):
        """Full passes the guest has reported on its serial port ('B's)."""
        with open(self.serial_path, "rb") as f:
            return f.read().count(b"B")

    def wait_passes(self, n, what):
        deadline = time.monotonic() + READY_S
        while (count := self.passes()) < n:
            self.check_alive()
            if time.monotonic() > deadline:
                raise Fail(f"{self.name} guest {what}: {count} page passes in {READY_S:.0f} s")
            time.sleep(0.01)
        return count

    def stop(self):
        if self.file:
            self.file.close()
            self.sock.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def die_with_parent():
    """In the child before exec: a TERM when this driver dies, even killed."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def migrate(args, src, dst, port):
    out = {"qemu_version": "{major}.{minor}.{micro}".format(**src.connect())}
    dst.connect()
    # The guest is running once it has written every page (its first pass).
    src.wait_passes(1, "did not start")
    c0, t0 = src.passes(), time.monotonic()
    time.sleep(args.warmup)
    c1 = src.wait_passes(c0 + 2, "stopped writing")  # at least two passes to time
    out["guest_pages_per_s_before"] = (c1 - c0) * PASS_PAGES / (time.monotonic() - t0)

    src.cmd("migrate-set-parameters", **{"max-bandwidth": args.bandwidth,
                                         "downtime-limit": args.downtime_limit_ms})
    out["parameters"] = {k: v for k, v in src.cmd("query-migrate-parameters").items()
                         if k in ("max-bandwidth", "downtime-limit")}
    m0, t0 = src.passes(), time.monotonic()
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    last, rates, cancelled_at = {}, [], None
    while True:
        info = src.cmd("query-migrate")
        status = info.get("status")
        if "ram" in info:
            last = info
            if info["ram"].get("dirty-pages-rate"):
                rates.append(info["ram"]["dirty-pages-rate"])
        if status in ("completed", "failed", "cancelled"):
            break
        elapsed_ms = info.get("total-time", (time.monotonic() - t0) * 1e3)
        if cancelled_at is None and status not in ("cancelling",) and elapsed_ms >= args.max_time * 1e3:
            src.cmd("migrate_cancel")
            cancelled_at = elapsed_ms
        time.sleep(POLL_S)
    elapsed = time.monotonic() - t0
    passes = src.passes() - m0
    if status == "failed":
        raise Fail(f"the migration failed: {info.get('error-desc', 'QEMU gave no reason')}")
    if status == "cancelled" and cancelled_at is None:
        raise Fail("the migration was cancelled, not by this script")
    ram = last.get("ram", {})
    out.update({
        "status": status,
        "converged": status == "completed",
        "cancelled_at_ms": cancelled_at,
        "total_time_ms": info["total-time"] if status == "completed" else last.get("total-time"),
        "downtime_ms": info.get("downtime") if status == "completed" else None,
        "setup_time_ms": last.get("setup-time"),
        "expected_downtime_ms": last.get("expected-downtime"),
        "transferred_bytes": ram.get("transferred"),
        "dirty_sync_count": ram.get("dirty-sync-count"),
        "duplicate_pages": ram.get("duplicate"),
        "normal_pages": ram.get("normal"),
        "precopy_bytes": ram.get("precopy-bytes"),
        "downtime_bytes": ram.get("downtime-bytes"),
        "mbps": ram.get("mbps"),
        "dirty_pages_rate_median": statistics.median(rates) if rates else None,
        "dirty_pages_rate_samples": len(rates),
        # The source guest's own pace while it migrated (it runs on after a
        # cancel; after completion it stays paused, so this slightly
        # undercounts a completed run's rate).
        "guest_pages_per_s_during": passes * PASS_PAGES / elapsed,
        "migration_wall_ms": elapsed * 1e3,
    })
    t = out["total_time_ms"]
    out["dirty_syncs_per_s"] = out["dirty_sync_count"] / (t / 1e3) if t and out["dirty_sync_count"] else None
    if status == "completed":
        # The destination guest must run on: a page pass of its own.
        deadline = time.monotonic() + READY_S
        while dst.cmd("query-status").get("status") != "running":
            if time.monotonic() > deadline:
                raise Fail("the destination QEMU did not start running after the migration")
            time.sleep(0.01)
        dst.wait_passes(dst.passes() + 1, "did not run on after the migration")
        out["destination_ran"] = True
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--qemu", default="qemu-system-x86_64")
    p.add_argument("--image", required=True, help="the boot sector")
    p.add_argument("--workdir", required=True, help="for sockets, serial output and logs")
    p.add_argument("--mem", default="256M")
    p.add_argument("--bandwidth", type=int, required=True, help="max-bandwidth, bytes/s")
    p.add_argument("--downtime-limit-ms", type=int, default=300)
    p.add_argument("--max-time", type=float, default=28.0, help="seconds before migrate_cancel")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of guest rate measured first")
    p.add_argument("--json", required=True)
    args = p.parse_args()

    # A TERM from the calling script ends the QEMUs too (through finally).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    port = free_port()
    src = Qemu("source", args.qemu, args.image, args.workdir, args.mem)
    dst = None
    try:
        dst = Qemu("destination", args.qemu, args.image, args.workdir, args.mem,
                   ["-incoming", f"tcp:127.0.0.1:{port}"])
        out = migrate(args, src, dst, port)
    except Fail as e:
        print(f"qemu-migrate: {e}", file=sys.stderr)
        return 1
    finally:
        for q in (dst, src):
            if q:
                q.stop()
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
