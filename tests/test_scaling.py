"""The scaling model's arithmetic (pixart_ds.bench.scaling): collectives, the ZeRO-2 step, GPU-days, the records it
reads. Worked by hand on round numbers, then checked against Table 4 on the paper's own cluster."""
from __future__ import annotations

import json
import math
import os

import pytest

from pixart_ds.bench import scaling as S

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_collective_times_are_the_ring_formulas():
    # all-reduce: 2 (N-1)/N S / B + 2 L per bucket; reduce-scatter / all-gather: half the bytes, one latency.
    assert S.collective_time("all_reduce", 1e9, 2, 1e9, 1e-3) == pytest.approx(1.0 + 2e-3)
    assert S.collective_time("all_reduce", 8e9, 8, 1e9, 0.0) == pytest.approx(14.0)
    assert S.collective_time("all_gather", 8e9, 8, 1e9, 1e-3, buckets=3) == pytest.approx(7.0 + 3e-3)
    assert S.collective_time("reduce_scatter", 8e9, 8, 2e9, 0.0) == pytest.approx(3.5)
    assert S.collective_time("all_reduce", 1e9, 1, 1e9, 1.0) == 0.0  # one rank: nothing to send
    with pytest.raises(ValueError, match="unknown collective"):
        S.collective_time("broadcast", 1, 2, 1, 0)


def test_ring_latency_counts_network_and_nvlink_hops():
    assert S.ring_latency(16, 2, intra_latency=1.0, inter_latency=10.0) == 1 * 10 + 14 * 1
    assert S.ring_latency(8, 1, 1.0, 10.0) == 7.0
    assert S.ring_latency(1, 1, 1.0, 10.0) == 0.0


def test_interconnect_bandwidth_is_the_bottleneck_link():
    ic = S.H100_NVLINK_IB4
    assert ic.bandwidth(1) == pytest.approx(450e9 * 0.8)  # NVLink inside one node
    assert ic.bandwidth(8) == pytest.approx(200e9 * 0.8)  # 4 x 400 Gb/s = 200 GB/s per node
    assert S.V100_NVLINK_100G.bandwidth(8) == pytest.approx(12.5e9 * 0.8)


IC = S.Interconnect("test", "X", 100.0, gpus_per_node=8, intra_bw=10e9, inter_bw=2e9, intra_latency=1e-6,
                    inter_latency=1e-5, efficiency=0.5)


def test_zero2_step_by_hand():
    """16 GPUs (2 nodes), 1e9 parameters, 10 ms per image, global batch 320, micro batch at most 10: each GPU takes
    20 images in 2 micro-batches of 10; bf16 gradients (2 GB) are all-reduced twice, bf16 parameters (2 GB)
    all-gathered once, over the network at 2 GB/s x 0.5."""
    e = S.step_estimate(gpus=16, interconnect=IC, params=1_000_000_000, seconds_per_image=0.01, global_batch=320,
                        max_micro_batch=10, overlap=False, grad_checkpointing=False, steps=1000)
    bw, lat = 1e9, 1 * 1e-5 + 14 * 1e-6
    grad_one = 2 * 15 / 16 * 2e9 / bw + 2 * lat * 2  # two buckets of 5e8 elements
    par = 15 / 16 * 2e9 / bw + lat * 2
    assert (e.nodes, e.per_gpu_batch, e.micro_batch, e.accumulation) == (2, 20, 10, 2)
    assert e.compute_s == pytest.approx(0.2)
    assert e.grad_comm_s == pytest.approx(2 * grad_one) and e.grad_exposed_s == e.grad_comm_s
    assert e.param_comm_s == pytest.approx(par)
    assert e.step_s == pytest.approx(0.2 + 2 * grad_one + par)
    assert e.images_per_s_per_gpu == pytest.approx(20 / e.step_s) and e.efficiency == pytest.approx(0.2 / e.step_s)
    assert e.gpu_days == pytest.approx(16 * 1000 * e.step_s / 86_400)
    assert e.wall_days == pytest.approx(1000 * e.step_s / 86_400)

    # Overlapped: each micro-batch's reduction hides behind its backward (2/3 of its compute; 3/4 with recompute).
    o = S.step_estimate(gpus=16, interconnect=IC, params=1_000_000_000, seconds_per_image=0.01, global_batch=320,
                        max_micro_batch=10, overlap=True, grad_checkpointing=True)
    assert o.grad_exposed_s == pytest.approx(2 * max(0.0, grad_one - 0.75 * 0.1))
    assert o.step_s == pytest.approx(0.2 + o.grad_exposed_s + par) and o.gpu_days is None
    # Small gradients hide completely.
    h = S.step_estimate(gpus=16, interconnect=IC, params=1_000, seconds_per_image=0.01, global_batch=320,
                        max_micro_batch=10, overlap=True, grad_checkpointing=False)
    assert h.grad_exposed_s == 0.0 and h.grad_comm_s > 0

    # reduce_scatter instead of bucket all-reduce (use_multi_rank_bucket_allreduce: false) halves the gradient bytes.
    rs = S.step_estimate(gpus=16, interconnect=IC, params=1_000_000_000, seconds_per_image=0.01, global_batch=320,
                         max_micro_batch=10, overlap=False, grad_checkpointing=False,
                         zero=S.Zero2(grad_collective="reduce_scatter"))
    assert rs.grad_comm_s == pytest.approx(2 * (15 / 16 * 2e9 / bw + lat * 2))
    # One GPU communicates nothing; one node uses NVLink.
    one = S.step_estimate(gpus=1, interconnect=IC, params=10**9, seconds_per_image=0.01, global_batch=320,
                          max_micro_batch=10, overlap=False, grad_checkpointing=False)
    assert one.step_s == pytest.approx(3.2) and one.accumulation == 32
    node = S.step_estimate(gpus=8, interconnect=IC, params=10**9, seconds_per_image=0.01, global_batch=320,
                           max_micro_batch=10, overlap=False, grad_checkpointing=False)
    assert node.param_comm_s == pytest.approx(7 / 8 * 2e9 / 5e9 + 7e-6 * 2)
    with pytest.raises(ValueError):
        S.step_estimate(gpus=0, interconnect=IC, params=1, seconds_per_image=1, global_batch=1, max_micro_batch=1,
                        overlap=False, grad_checkpointing=False)


def test_table4_stage2_on_the_papers_cluster():
    """Fed the per-V100 throughput that Table 4's 672 V100-days imply, on 64 V100 (8 nodes, 100 Gb/s) at 178 x 64,
    the model gives back 672 V100-days plus the communication: a few percent at 6 s of compute per step."""
    images = 150_000 * 178 * 64
    rate = images / (672 * 86_400)  # 29.4 images/s per V100
    e = S.step_estimate(gpus=64, interconnect=S.V100_NVLINK_100G, params=610_856_096, seconds_per_image=1 / rate,
                        global_batch=178 * 64, max_micro_batch=178, overlap=False, grad_checkpointing=True,
                        steps=150_000)
    assert (e.nodes, e.accumulation, e.per_gpu_batch) == (8, 1, 178)
    assert e.compute_s * 64 * 150_000 / 86_400 == pytest.approx(672)
    assert 672 < e.gpu_days < 672 * 1.08  # +6%: 0.36 s of communication beside 6.05 s of compute per step


def test_device_speed_from_the_records():
    path = os.path.join(REPO, "benchmarks", "results", "gpu_attention_h200_202611.json")
    with open(path) as f:
        rec = json.load(f)
    sp = S.device_speed(rec, path)
    assert sp.seconds_per_image == pytest.approx(1 / rec["speed"]["sdpa"]["images_per_s"])
    assert sp.batch == 32 and sp.peak_tflops == 989.0 and not sp.includes_recompute and not sp.includes_optimizer
    assert "bare forward + backward" in sp.kind
    rc = sp.for_recipe(4 / 3, grad_checkpointing=True)
    assert rc.seconds_per_image == pytest.approx(sp.seconds_per_image * 4 / 3) and rc.includes_recompute
    assert rc.for_recipe(4 / 3, True) is rc and sp.for_recipe(4 / 3, False) is sp
    v = sp.on(125.0, "V100 SXM2")
    assert v.seconds_per_image == pytest.approx(sp.seconds_per_image * 989 / 125) and "same MFU" in v.notes[-1]
    assert sp.on(989.0, "H100 SXM") is sp

    path = os.path.join(REPO, "benchmarks", "results", "stage2_sam256_cpu-2core_202611.json")
    with open(path) as f:
        rec = json.load(f)
    sp = S.device_speed(rec, path)
    assert sp.seconds_per_image == pytest.approx(1 / rec["results"]["images_per_s_per_device"])
    assert sp.includes_optimizer and sp.includes_recompute and sp.batch == rec["measure"]["micro_batch_size"]
    # A GPU MFU-style record: images/s at the top level, the batch and recomputation named.
    sp = S.device_speed({"hardware": {"name": "NVIDIA H100", "peak_tflops": 989.0}, "images_per_s": 400.0,
                         "batch": 64, "grad_checkpointing": True}, "x.json")
    assert sp.seconds_per_image == pytest.approx(1 / 400) and sp.includes_recompute and sp.batch == 64
    with pytest.raises(ValueError, match="no images/s"):
        S.device_speed({"schema": "other/1"}, "y.json")


def test_zero2_bytes_of_pixart_xl2():
    """What DeepSpeed moves per micro-batch and per step for PixArt-XL/2 in bf16: 1.22 GB each."""
    p = 610_856_096
    z = S.Zero2()
    assert p * z.grad_bytes / 1e9 == pytest.approx(1.2217, abs=1e-4) and z.grad_collective == "all_reduce"
    assert math.ceil(p / z.reduce_bucket) == 2  # two buckets: the latency is paid twice per collective


def test_gloo_estimate_adds_its_local_work():
    """The validation's estimate of torch's gloo collectives: the ring formula plus the sums and copies gloo does on
    a CPU; all_gather_into_tensor fills a new buffer and copies it out; reduce_scatter_tensor is an all-reduce of a
    new clone of the whole tensor, then a copy of the rank's chunk."""
    bw, lat, red, cp, fresh = 1e9, 1e-4, 4e9, 8e9, 2e9
    S_ = 64e6
    ar = S.gloo_collective_time("all_reduce", S_, 2, bw, lat, red, cp, fresh)
    assert ar == pytest.approx(S.collective_time("all_reduce", S_, 2, bw, lat) + 0.5 * S_ / red)
    ag = S.gloo_collective_time("all_gather", S_, 2, bw, lat, red, cp, fresh)
    assert ag == pytest.approx(0.5 * S_ / bw + lat + S_ / fresh + S_ / cp)
    rs = S.gloo_collective_time("reduce_scatter", S_, 2, bw, lat, red, cp, fresh)
    assert rs == pytest.approx(S_ / fresh + ar + S_ / 2 / cp)
    assert S.gloo_collective_time("all_gather", S_, 2, bw, lat, red, cp) == pytest.approx(
        0.5 * S_ / bw + lat + 2 * S_ / cp)  # without a fresh-memory rate: the plain copy rate
    with pytest.raises(ValueError):
        S.gloo_collective_time("broadcast", S_, 2, bw, lat, red, cp)


def test_report_script_reproduces_the_committed_report(tmp_path):
    """`benchmarks/scaling.py report` as a user runs it, fed the inputs recorded in the committed report (its
    network measurement and the H200 record): the same projection, a plot, and exit 0 (all-reduce within 2x)."""
    import glob
    import subprocess
    import sys

    committed = sorted(glob.glob(os.path.join(REPO, "benchmarks", "results", "scaling_stage2_sam256_*.json")))[-1]
    with open(committed) as f:
        rec = json.load(f)
    comm = tmp_path / "comm.json"
    comm.write_text(json.dumps(rec["validation"]["comm"]))
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "scaling.py"), "report", "--comm", str(comm),
                        "--record", os.path.join(REPO, rec["speed"]["source"]), "--out", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stderr
    assert "validation, all-reduce >= 8 MiB" in p.stdout and ": within 2x" in p.stdout
    new = json.loads(next(out.glob("*.json")).read_text())
    assert new["params"] == rec["params"] == 610_856_096
    for key in rec["projection"]:
        for field in ("step_s", "gpu_days", "efficiency", "grad_comm_s", "param_comm_s"):
            assert [r[field] for r in new["projection"][key]["rows"]] == pytest.approx(
                [r[field] for r in rec["projection"][key]["rows"]]), (key, field)
    assert list(out.glob("*.png")) and "## 2. The communication half" in next(out.glob("*.md")).read_text()

    p = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "scaling.py"), "report", "--comm",
                        str(tmp_path / "nope.json"), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "scaling report: error: --comm" in p.stderr and "nope.json" in p.stderr
