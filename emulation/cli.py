"""Bring an emulated edge-cloud testbed up by hand.

    python -m emulation.cli up --uplink-mbps 5 --downlink-mbps 20 --delay-ms 20 --port 50051

prints the namespaces and addresses, then keeps everything up until Ctrl-C or
SIGTERM, and tears it all down. Run a cloud node in the cloud namespace on
`--port`, and point the edge agent (in the edge namespace) at the relay's
address printed here: that path has the shaped rate and the added delay.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading

from emulation import cpu, netns
from emulation.cpu import CpuQuota
from emulation.netns import Testbed
from emulation.relay import Relay

logger = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m emulation.cli", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="create the testbed and keep it up until Ctrl-C")
    up.add_argument("--uplink-mbps", type=float, default=None, help="edge->cloud rate in Mbit/s (default: unshaped)")
    up.add_argument("--downlink-mbps", type=float, default=None, help="cloud->edge rate in Mbit/s (default: unshaped)")
    up.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay added by the relay in ms (RTT grows by twice this)")
    up.add_argument("--port", type=int, default=50051,
                    help="cloud-side TCP port the relay forwards to; the relay listens on 127.0.0.1:PORT in the edge namespace")
    up.add_argument("--edge-cpus", type=float, default=None,
                    help="also create a CPU-quota cgroup of this many CPUs for edge processes (default: none)")
    return parser


def _up(args: argparse.Namespace) -> int:
    reason = netns.available()
    if reason is not None:
        print(f"emulation unavailable: {reason}", file=sys.stderr)
        return 2
    if args.edge_cpus is not None and (reason := cpu.available()) is not None:
        print(f"CPU quota unavailable: {reason}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):  # explicit: SIGINT may arrive ignored in background jobs
        signal.signal(signum, lambda *_: stop.set())
    with contextlib.ExitStack() as stack:
        bed = stack.enter_context(Testbed(uplink_mbps=args.uplink_mbps, downlink_mbps=args.downlink_mbps))
        relay = stack.enter_context(Relay(
            (bed.cloud_addr, args.port), listen=("127.0.0.1", args.port), delay_ms=args.delay_ms,
            listen_netns=bed.edge_ns, target_netns=bed.cloud_ns,
        ))
        print(f"edge  namespace {bed.edge_ns}  address {bed.edge_addr}/{bed.prefixlen}  uplink {args.uplink_mbps or 'unshaped'} Mbit/s")
        print(f"cloud namespace {bed.cloud_ns}  address {bed.cloud_addr}/{bed.prefixlen}  downlink {args.downlink_mbps or 'unshaped'} Mbit/s")
        print(f"relay (edge ns) {relay.address[0]}:{relay.address[1]} -> {bed.cloud_addr}:{args.port}, "
              f"+{args.delay_ms:g} ms each way")
        print(f"run commands with: ip netns exec {bed.edge_ns} ... / ip netns exec {bed.cloud_ns} ...")
        if args.edge_cpus is not None:
            quota = stack.enter_context(CpuQuota(args.edge_cpus))
            print(f"edge CPU quota {args.edge_cpus:g} CPUs: echo $$ > {quota.path / 'cgroup.procs'}")
        print("up; Ctrl-C to tear down", flush=True)
        while not stop.wait(1.0):
            pass
    print("torn down")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = _parser().parse_args(argv)
    if args.command == "up":
        return _up(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
