"""A worker's transport settings (TransportConfig), apart from the NIXL transport itself: the launcher, the worker
config and the `disagg serve` CLI name them in processes that load no torch and no NIXL (the router's)."""

from __future__ import annotations

from dataclasses import dataclass, field

AUTO = "auto"


@dataclass
class TransportConfig:
    """Which network devices UCX may carry KV over.

    `ucx_net_devices`: "auto" picks every interface that is up and has an IPv4 address (loopback included), so
    workers on different hosts reach each other - unless UCX_NET_DEVICES is already set in the environment,
    which then wins; any other value (a UCX device list: "lo", "eth0", "mlx5_0:1,eth0") is used as given.

    `progress_delay_us`: the longest the NIXL UCX progress thread sleeps in poll() between wake-ups (it wakes at
    once on UCX events).  NIXL's Python API passes 0, and its thread then spins in poll(timeout=0): one whole
    core per agent, idle or not (measured: 100% of a core at idle, 1.7% with 1,000 us).  On a host where the
    workers share few cores those spinning threads took the cores from the engines.  0 keeps NIXL's behaviour.
    """

    ucx_net_devices: str = field(
        default=AUTO,
        metadata={
            "help": "network devices UCX carries KV over: auto (every interface that is up with an IPv4 address), "
            "or a UCX list such as lo, eth0, mlx5_0:1 (UCX_NET_DEVICES in the environment wins over auto)"
        },
    )
    progress_delay_us: int = field(
        default=1000,
        metadata={
            "help": "longest sleep of the NIXL progress thread between wake-ups (it wakes at once on transfers); "
            "0 is NIXL's own setting, which spins one core per worker",
            "flag": "--nixl-progress-delay-us",
        },
    )
