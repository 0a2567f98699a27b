"""Scaling model: step time and GPU-days of a stage on N GPUs from one device's measured speed plus the ZeRO-2
communication DeepSpeed does per step, with an alpha-beta (latency-bandwidth) cost per collective.

What DeepSpeed 0.19 communicates per optimizer step with ZeRO-2 (deepspeed/runtime/zero/stage_1_and_2.py):
- gradients, at EVERY micro-batch (stage 2 partitions gradients, so each backward reduces its buckets as they fill:
  `reduce_independent_p_g_buckets_and_remove_grads` -> `average_tensor`). With the default
  `use_multi_rank_bucket_allreduce: true` (deepspeed/runtime/zero/config.py) a bucket is ALL-REDUCED and each rank
  keeps its partition (`allreduce_and_scatter`); with it false each partition is reduced to its owner, a
  reduce-scatter's volume. In `communication_data_type`, which defaults to the training dtype
  (deepspeed/runtime/engine.py: bf16 under bf16, fp16 under fp16): 2 bytes per parameter for PixArt's bf16 recipes.
- parameters, once per step after the optimizer: every rank all-gathers the updated bf16/fp16 partitions
  (`all_gather_dp_groups`), 2 bytes per parameter. Not overlapped with compute in ZeRO-1/2.
- optimizer state and fp32 master weights never move (each rank updates its own 1/N).
With `overlap_comm` the gradient reduction runs on a side stream during the backward pass, so only the part that
outlasts the backward (and the recomputed forward, with gradient checkpointing) is exposed; our recipes set it off
(pixart_ds/train/zero.py), which this model calls "not overlapped".

Cost of one collective over N ranks on n nodes (ring algorithms, as NCCL and gloo run them for large messages):
  all-reduce of S bytes       2 (N-1)/N S / B + 2 L
  reduce-scatter / all-gather   (N-1)/N S / B + L        (S = the full, gathered size)
  B = the bottleneck bandwidth one rank's ring traffic sees: the node's network injection bandwidth (all its NICs:
      a ring crosses each node boundary once, so a node sends one rank's volume per ring) when n > 1, else the
      intra-node (NVLink) bandwidth per GPU; each a link rate x an achievable fraction (busbw/link);
  L = ring latency: (n-1) network hops + (N-n) intra-node hops, each at its per-hop latency, per bucket.
DeepSpeed splits the traffic into buckets of reduce_bucket_size / allgather_bucket_size elements (5e8 by default):
each bucket pays the latency again.

Step (per GPU b = global batch / N images, micro-batches of at most the recipe's micro batch, a = ceil(b / micro)):
  compute   = b x seconds per image on one device (the measured input, see `DeviceSpeed`)
  gradients = a x all-reduce(2 P bytes)                   (exposed: all of it, or what outlasts the backward)
  params    = all-gather(2 P bytes)
  step      = compute + exposed gradients + params;  GPU-days = N x steps x step / 86,400
The per-image compute time is taken as measured at the record's batch for every b (small per-GPU batches at 1,024
GPUs run less efficiently than that), and the optimizer step's own time is left in the measurement (a single-device
record updates all parameters; with ZeRO each rank updates 1/N): both make the projection optimistic at small b and
pessimistic at large N respectively, and are small beside the terms above.

`measure_link` and `time_collective` measure the same quantities on a real two-host network (benchmarks/scaling.py
`comm`, run by srun with one rank per host), and `collective_time` predicts the collective from the link's own
bandwidth and latency: that is how the communication half of the model is validated. On CPUs the collective's own
local work (gloo sums and copies on one thread, at a few GB/s) is not negligible beside the network as it is on a GPU
(HBM at TB/s beside 25-200 GB/s links), so the validation adds it, measured on the same host (`local_rates`,
`gloo_collective_time`), and shows the alpha-beta part alone beside it.
"""
from __future__ import annotations

import math
import socket
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as tdist

SECONDS_PER_DAY = 86_400
GiB = 2**30


# ----------------------------------------------------------------------------------------------------------------
# Interconnects
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interconnect:
    """A cluster's node: GPUs per node and its links. Bandwidths in bytes/s (one direction), latencies in s."""

    name: str
    gpu: str  # the card (its peak scales the single-device speed when the record was measured on another card)
    gpu_peak_tflops: float
    gpus_per_node: int
    intra_bw: float  # NVLink, per GPU, one direction
    inter_bw: float  # the node's network injection bandwidth: all its NICs together, one direction
    intra_latency: float
    inter_latency: float
    efficiency: float = 0.8  # achievable fraction of the link rates for large collectives (busbw / link)
    note: str = ""

    def bandwidth(self, nodes: int) -> float:
        raw = self.intra_bw if nodes <= 1 else min(self.intra_bw, self.inter_bw)
        return raw * self.efficiency


GB = 1e9
# 8x H100 SXM per node: NVLink 4 (18 links, 900 GB/s both directions per GPU); 4x 400 Gb/s InfiniBand NDR per node.
H100_NVLINK_IB4 = Interconnect(
    "8x H100 SXM per node, NVLink 4 + 4x 400 Gb/s InfiniBand", "H100 SXM", 989.0, 8,
    intra_bw=450 * GB, inter_bw=4 * 400e9 / 8, intra_latency=3e-6, inter_latency=6e-6,
    note="NVLink 4: 450 GB/s per GPU per direction; network: 4 x 400 Gb/s = 200 GB/s per node")
# The paper's cluster (PixArt-alpha §2.4 / Table 4: 64 V100): 8x V100 SXM2 per node (NVLink 2, 6 links x 25 GB/s per
# direction), 100 Gb/s between nodes.
V100_NVLINK_100G = Interconnect(
    "8x V100 SXM2 per node, NVLink 2 + 100 Gb/s (the paper's 64 V100)", "V100 SXM2", 125.0, 8,
    intra_bw=150 * GB, inter_bw=100e9 / 8, intra_latency=5e-6, inter_latency=8e-6,
    note="NVLink 2: 150 GB/s per GPU per direction; network: 100 Gb/s = 12.5 GB/s per node")
INTERCONNECTS = {"h100-ib": H100_NVLINK_IB4, "v100-100g": V100_NVLINK_100G}


# ----------------------------------------------------------------------------------------------------------------
# Collectives (alpha-beta)
# ----------------------------------------------------------------------------------------------------------------


def ring_latency(ranks: int, nodes: int, intra_latency: float, inter_latency: float) -> float:
    """One pass of a ring over `ranks` ranks on `nodes` nodes: (nodes-1) network hops, the rest inside nodes."""
    if ranks <= 1:
        return 0.0
    nodes = max(1, min(nodes, ranks))
    inter_hops = nodes - 1 if nodes > 1 else 0
    return inter_hops * inter_latency + (ranks - 1 - inter_hops) * intra_latency


def collective_time(op: str, nbytes: float, ranks: int, bandwidth: float, latency: float, buckets: int = 1) -> float:
    """Seconds for one ring collective of `nbytes` (the full tensor: the all-reduced one, or the gathered one) on
    `ranks` ranks at per-rank `bandwidth` (bytes/s) and one-pass ring `latency` (s), split into `buckets`."""
    if ranks <= 1 or nbytes <= 0:
        return 0.0
    frac = (ranks - 1) / ranks
    if op == "all_reduce":
        return 2 * frac * nbytes / bandwidth + 2 * latency * buckets
    if op in ("reduce_scatter", "all_gather"):
        return frac * nbytes / bandwidth + latency * buckets
    raise ValueError(f"unknown collective {op!r} (all_reduce, reduce_scatter, all_gather)")


# ----------------------------------------------------------------------------------------------------------------
# ZeRO-2 step
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Zero2:
    """How DeepSpeed communicates (defaults: DeepSpeed 0.19 with a bf16 recipe; see the module docstring)."""

    grad_bytes: int = 2  # communication_data_type = the training dtype (bf16)
    param_bytes: int = 2  # the bf16 copy of the parameters is all-gathered
    grad_collective: str = "all_reduce"  # use_multi_rank_bucket_allreduce: true; "reduce_scatter" when false
    reduce_bucket: int = 500_000_000  # elements (reduce_bucket_size)
    allgather_bucket: int = 500_000_000  # elements (allgather_bucket_size)


@dataclass(frozen=True)
class StepEstimate:
    gpus: int
    nodes: int
    per_gpu_batch: float
    micro_batch: int
    accumulation: int
    compute_s: float
    grad_comm_s: float  # all of it
    grad_exposed_s: float  # what the step waits for
    param_comm_s: float
    step_s: float
    images_per_s_per_gpu: float
    efficiency: float  # compute / step
    gpu_days: float | None = None
    wall_days: float | None = None


def backward_share(grad_checkpointing: bool) -> float:
    """Share of a micro-step's compute during which gradient reduction can overlap: backward = 2 x forward; with
    gradient checkpointing the recomputed forward runs inside the backward pass too (1 + 2 of 1 + 1 + 2)."""
    return 3 / 4 if grad_checkpointing else 2 / 3


def step_estimate(*, gpus: int, interconnect: Interconnect, params: int, seconds_per_image: float,
                  global_batch: int, max_micro_batch: int, overlap: bool, grad_checkpointing: bool,
                  zero: Zero2 = Zero2(), steps: int | None = None) -> StepEstimate:
    """One optimizer step of ZeRO-2 data parallelism on `gpus` GPUs (see the module docstring)."""
    if gpus < 1 or global_batch < 1 or max_micro_batch < 1 or seconds_per_image <= 0:
        raise ValueError("gpus, global_batch, max_micro_batch and seconds_per_image must be positive")
    g = interconnect.gpus_per_node
    nodes = math.ceil(gpus / g)
    b = global_batch / gpus
    accum = max(1, math.ceil(b / max_micro_batch))
    micro = math.ceil(b / accum)
    bw = interconnect.bandwidth(nodes)
    lat = ring_latency(gpus, nodes, interconnect.intra_latency, interconnect.inter_latency)
    compute = b * seconds_per_image
    grad_one = collective_time(zero.grad_collective, params * zero.grad_bytes, gpus, bw, lat,
                               math.ceil(params / zero.reduce_bucket))
    grad = accum * grad_one
    if overlap:
        hidden = backward_share(grad_checkpointing) * compute / accum
        exposed = accum * max(0.0, grad_one - hidden)
    else:
        exposed = grad
    par = collective_time("all_gather", params * zero.param_bytes, gpus, bw, lat,
                          math.ceil(params / zero.allgather_bucket))
    step = compute + exposed + par
    est = StepEstimate(gpus, nodes, b, micro, accum, compute, grad, exposed, par, step, b / step, compute / step)
    if steps is not None:
        wall = steps * step / SECONDS_PER_DAY
        est = StepEstimate(**{**asdict(est), "gpu_days": gpus * wall, "wall_days": wall})
    return est


# ----------------------------------------------------------------------------------------------------------------
# The single-device input
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceSpeed:
    """Seconds per training image on one device, and what the number is."""

    seconds_per_image: float
    batch: int
    device: str
    peak_tflops: float | None
    source: str  # the record file
    kind: str  # what was timed
    includes_recompute: bool
    includes_optimizer: bool
    notes: list[str] = field(default_factory=list)

    def for_recipe(self, recompute_factor: float, grad_checkpointing: bool) -> DeviceSpeed:
        """Add the recomputed forward of gradient checkpointing when the recipe uses it and the record did not."""
        if grad_checkpointing and not self.includes_recompute:
            return DeviceSpeed(self.seconds_per_image * recompute_factor, self.batch, self.device, self.peak_tflops,
                               self.source, self.kind, True, self.includes_optimizer,
                               self.notes + [f"x {recompute_factor:.3f} for the recipe's gradient checkpointing "
                                             f"(executed / model FLOPs per image, pixart_ds/bench/flops.py)"])
        return self

    def on(self, peak_tflops: float, name: str) -> DeviceSpeed:
        """The same MFU on another card: time scales with the peaks' ratio."""
        if not self.peak_tflops or abs(peak_tflops - self.peak_tflops) < 1e-9:
            return self
        r = self.peak_tflops / peak_tflops
        return DeviceSpeed(self.seconds_per_image * r, self.batch, name, peak_tflops, self.source, self.kind,
                           self.includes_recompute, self.includes_optimizer,
                           self.notes + [f"x {r:.2f} from {self.device} to {name} at the same MFU "
                                         f"({self.peak_tflops:g} / {peak_tflops:g} TFLOP/s)"])


def _find(d: dict, *paths: str):
    for p in paths:
        cur = d
        for k in p.split("."):
            cur = cur.get(k) if isinstance(cur, dict) else None
        if cur is not None:
            return cur
    return None


def device_speed(record: dict, source: str) -> DeviceSpeed:
    """The single-device speed in a benchmark record:
    - `pixart_ds.throughput/1` (benchmarks/throughput.py): the production train_step (optimizer and EMA included,
      gradient checkpointing as measured);
    - `pixart_ds.gpu_attention/1` (benchmarks/gpu_attention.py): a bare forward + backward of the model, no
      optimizer, no recomputation, with the backend `auto` resolved to;
    - any other record that carries images/s (a GPU MFU benchmark's, e.g.): `images_per_s_per_device` or
      `images_per_s` at the top level or under `results`, the batch under `batch` / `micro_batch_size` / `measure` /
      `args`, the device under `hardware`, and `grad_checkpointing` where it says whether recomputation was timed."""
    hw = record.get("hardware") or {}
    device = hw.get("name") or hw.get("slug") or "unknown device"
    peak = hw.get("peak_tflops")
    schema = record.get("schema", "")
    if schema.startswith("pixart_ds.gpu_attention/"):
        backend = record.get("auto_resolves_to") or next(iter(record["speed"]))
        rate = float(record["speed"][backend]["images_per_s"])
        batch = int(_find(record, "args.batch") or 0)
        return DeviceSpeed(1 / rate, batch, device, peak, source,
                           f"bare forward + backward of {_find(record, 'args.preset') or 'the model'} "
                           f"({backend} attention, batch {batch}; no optimizer step, no recomputation)",
                           includes_recompute=False, includes_optimizer=False)
    rate = _find(record, "results.images_per_s_per_device", "images_per_s_per_device", "results.images_per_s",
                 "images_per_s")
    if rate is None:
        raise ValueError(f"{source}: no images/s in this record (expected results.images_per_s_per_device, "
                         f"images_per_s, or a gpu_attention record)")
    batch = int(_find(record, "measure.micro_batch_size", "micro_batch_size", "batch", "args.batch") or 0)
    ckpt = _find(record, "measure.grad_checkpointing", "grad_checkpointing", "config.model.grad_checkpointing")
    optimizer = schema.startswith("pixart_ds.throughput/") or bool(_find(record, "includes_optimizer"))
    kind = ("the production train_step (forward, loss, backward, optimizer step, EMA)" if optimizer
            else "a training step as the record describes it")
    return DeviceSpeed(1 / float(rate), batch, device, peak, source, f"{kind}, batch {batch}",
                       includes_recompute=bool(ckpt), includes_optimizer=optimizer)


# ----------------------------------------------------------------------------------------------------------------
# Measuring a real network (two hosts, one rank each)
# ----------------------------------------------------------------------------------------------------------------


def _recv_exact(conn: socket.socket, n: int, buf: bytearray) -> None:
    """Read exactly n bytes into (and over) buf, discarding them."""
    view = memoryview(buf)
    got = 0
    while got < n:
        k = conn.recv_into(view, min(len(buf), n - got))
        if not k:
            raise ConnectionError("peer closed the connection")
        got += k


def _serve_link(sock: socket.socket, nbytes: int, pings: int, rounds: int) -> None:
    """The receiving end of measure_link (a thread on the peer)."""
    conn, _ = sock.accept()
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        one = bytearray(1)
        for _ in range(pings):
            _recv_exact(conn, 1, one)
            conn.sendall(b"x")
        buf = bytearray(1 << 20)
        payload = bytes(1 << 20)
        for _ in range(rounds):  # one direction, then both at once
            _recv_exact(conn, nbytes, buf)
            conn.sendall(b"k")
            sender = threading.Thread(target=lambda: [conn.sendall(payload) for _ in range(nbytes >> 20)])
            sender.start()
            _recv_exact(conn, nbytes, buf)
            sender.join()
            conn.sendall(b"k")


def link_server(nbytes: int, pings: int = 200, rounds: int = 5) -> tuple[int, threading.Thread]:
    """Start the peer side of measure_link; returns (port, thread)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("", 0))
    s.listen(1)
    t = threading.Thread(target=_serve_link, args=(s, nbytes, pings, rounds), daemon=True)
    t.start()
    return s.getsockname()[1], t


def measure_link(host: str, port: int, nbytes: int, pings: int = 200, rounds: int = 5) -> dict:
    """Point-to-point TCP to a link_server: latency = median round trip / 2 of 1-byte messages; bandwidth of
    `nbytes` in one direction alone, and per direction while both directions carry `nbytes` at once (what a ring
    collective does: every rank sends and receives together). Medians of `rounds`. nbytes: a multiple of 1 MiB."""
    if nbytes % (1 << 20):
        raise ValueError("nbytes must be a multiple of 1 MiB")
    conn = socket.create_connection((host, port), timeout=60)
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        one = bytearray(1)
        rtts = []
        for _ in range(pings):
            t0 = time.perf_counter()
            conn.sendall(b"x")
            _recv_exact(conn, 1, one)
            rtts.append(time.perf_counter() - t0)
        payload = bytes(1 << 20)
        uni, bi = [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(nbytes >> 20):
                conn.sendall(payload)
            _recv_exact(conn, 1, one)
            uni.append(nbytes / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            receiver = threading.Thread(target=_recv_exact, args=(conn, nbytes, bytearray(1 << 20)))
            receiver.start()
            for _ in range(nbytes >> 20):
                conn.sendall(payload)
            receiver.join()
            _recv_exact(conn, 1, one)
            bi.append(nbytes / (time.perf_counter() - t0))
    return {"latency_s": statistics.median(rtts) / 2, "bandwidth_one_way": statistics.median(uni),
            "bandwidth_both_ways": statistics.median(bi), "nbytes": nbytes, "pings": pings, "rounds": rounds}


def local_rates(nbytes: int, dtypes, repeats: int = 5) -> dict:
    """This host's bytes/s for the local work a CPU collective adds to the transfers, on one thread (gloo runs a
    collective on one thread): summing two tensors of `nbytes` (per dtype name), copying into an existing tensor, and
    copying into a NEW one (its memory is allocated and first touched: the buffers gloo allocates per call). Fastest
    of `repeats` (interference only adds time)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {"reduce": {}, "copy": 0.0, "fresh_copy": 0.0}
        for dtype in dtypes:
            n = nbytes // torch.tensor([], dtype=dtype).element_size()
            a, b = torch.ones(n, dtype=dtype), torch.ones(n, dtype=dtype)
            best = {"reduce": float("inf"), "copy": float("inf"), "fresh_copy": float("inf")}
            for _ in range(repeats):
                for kind in best:
                    t0 = time.perf_counter()
                    if kind == "reduce":
                        a.add_(b)
                    elif kind == "copy":
                        a.copy_(b)
                    else:
                        c = torch.empty(n, dtype=dtype).copy_(b)
                    best[kind] = min(best[kind], time.perf_counter() - t0)
                    if kind == "fresh_copy":
                        del c  # freed: the next one is fresh memory again
            out["reduce"][str(dtype).replace("torch.", "")] = nbytes / best["reduce"]
            out["copy"] = max(out["copy"], nbytes / best["copy"])
            out["fresh_copy"] = max(out["fresh_copy"], nbytes / best["fresh_copy"])
        return out
    finally:
        torch.set_num_threads(threads)


def gloo_collective_time(op: str, nbytes: float, ranks: int, bandwidth: float, latency: float,
                         reduce_bw: float, copy_bw: float, fresh_copy_bw: float | None = None) -> float:
    """collective_time plus the local work torch's gloo backend adds on a CPU (torch/csrc/distributed/c10d/
    ProcessGroupGloo.cpp, gloo/allgather.cc): its ring all-reduce works in place and sums (N-1)/N of the tensor;
    all_gather_into_tensor allocates a new flat buffer per call (`newLikeFlat`), gloo primes it with this rank's
    part and receives the rest into it, then it is copied out into the output; reduce_scatter_tensor clones the
    input (new memory), all-reduces the WHOLE clone, and copies this rank's chunk out
    (`reduce_scatter_tensor_coalesced`): an all-reduce's volume, not a ring reduce-scatter's. `fresh_copy_bw`: bytes/s
    of a copy into newly allocated memory (default: copy_bw)."""
    fresh = fresh_copy_bw or copy_bw
    frac = (ranks - 1) / ranks if ranks > 1 else 0.0
    if op == "all_reduce":
        return collective_time(op, nbytes, ranks, bandwidth, latency) + frac * nbytes / reduce_bw
    if op == "all_gather":
        return collective_time(op, nbytes, ranks, bandwidth, latency) + nbytes / fresh + nbytes / copy_bw
    if op == "reduce_scatter":
        return (nbytes / fresh + gloo_collective_time("all_reduce", nbytes, ranks, bandwidth, latency, reduce_bw,
                                                      copy_bw) + nbytes / ranks / copy_bw)
    raise ValueError(f"unknown collective {op!r}")


def time_collective(op: str, nbytes: int, dtype, repeats: int = 5, warmup: int = 1) -> dict:
    """Median seconds of one torch.distributed collective of `nbytes` (the full tensor) in `dtype` on the default
    process group, timed between barriers."""
    world = tdist.get_world_size()
    elem = torch.tensor([], dtype=dtype).element_size()
    n = nbytes // elem // world * world
    full = torch.ones(n, dtype=dtype)
    part = torch.ones(n // world, dtype=dtype)
    times = []
    for i in range(warmup + repeats):
        tdist.barrier()
        t0 = time.perf_counter()
        if op == "all_reduce":
            tdist.all_reduce(full)
        elif op == "all_gather":
            tdist.all_gather_into_tensor(full, part)
        elif op == "reduce_scatter":
            tdist.reduce_scatter_tensor(part, full)
        else:
            raise ValueError(f"unknown collective {op!r}")
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
    return {"op": op, "dtype": str(dtype).replace("torch.", ""), "nbytes": n * elem,
            "median_s": statistics.median(times), "min_s": min(times), "times_s": times}
