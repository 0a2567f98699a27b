"""build_loader: the recipe's data section -> a resumable StreamingDataLoader of named tensors.

This is the only module that knows where shards live and how sources are weighted (DESIGN.md principle 4).

- Sources (`data.sources`): one feature-MDS directory each, mixed by `proportion` (relative weights; all null =
  natural sizes). Streaming draws each source's share per epoch (up- or down-sampling), so 3:1 means 3:1 per epoch.
- Multi-scale (`data.multi_scale`): each source directory holds one stream per aspect-ratio bucket (sub-directories
  with their own index.json, named h{H}_w{W} by pixart_ds.data.buckets), listed with their sizes and shapes in
  its manifest.jsonl (pixart_ds.data.manifest), which is what makes a `remote:` multi-scale source possible: the
  manifest is fetched into the local cache (`local`, or a per-node temporary directory) and each bucket becomes
  Stream(remote=<remote>/<bucket>, local=<local>/<bucket>). Every bucket becomes a Stream whose weight
  is its source's proportion split by bucket size, and `batching_method="per_stream"` makes every global
  micro-batch (micro batch x ranks) come from one bucket, so no batch mixes shapes (paper §2.4, PixArtMS; official
  code: AspectRatioBatchSampler). A bucket with fewer samples than one global micro-batch cannot fill a batch and
  is left out with a warning (Streaming would raise).
- Order: shuffled with seed `train.seed`; `num_canonical_nodes` is fixed (recipe value or 1) so the global sample
  order does not depend on the number of nodes/ranks, and a state saved at one world size resumes at another.
- Topology: Streaming reads only RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE. They are exported from the
  DistEnv (or the environment via pixart_ds.dist.dist_env: LOCAL_SIZE under the deepspeed launcher,
  SLURM_* under srun) before the dataset is built; without LOCAL_WORLD_SIZE two ranks on a node both act as the
  local leader and die in shared memory.
- Stale shared memory (left by a crashed run) is removed at start by local rank 0 before the first barrier; only
  Streaming segments that no live process maps are touched, so other runs on the machine are unaffected.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import traceback
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as tdist
from streaming import Stream, StreamingDataLoader
from streaming.base.batching import generate_work

from pixart_ds.config import Config, ConfigError, latent_size
from pixart_ds.data import manifest as mf
from pixart_ds.data.dataset import CorruptSampleError, FeatureDataset, StreamSpec, validate_stream
from pixart_ds.data.schema import has_index, num_samples, read_index
from pixart_ds.dist import dist_env as _detect

logger = logging.getLogger(__name__)

# Fixed when the recipe leaves data.num_canonical_nodes null: the global order must not depend on the number of
# physical nodes of the first run. 1 divides every node count (Streaming requires one of canonical/physical nodes to
# divide the other); each node then reads across all shards, which costs nothing on a shared filesystem.
DEFAULT_NUM_CANONICAL_NODES = 1


# ----------------------------------------------------------------------------------------------------------------
# Topology and shared memory
# ----------------------------------------------------------------------------------------------------------------

_TOPOLOGY_VARS = (("RANK", "rank"), ("WORLD_SIZE", "world_size"), ("LOCAL_RANK", "local_rank"),
                  ("LOCAL_WORLD_SIZE", "local_world_size"))


@dataclass(frozen=True)
class Topology:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def resolve_topology(dist_env: Any = None, environ=None) -> Topology:
    """Rank/world/local rank/local world from `dist_env` (any object with those attributes, e.g.
    pixart_ds.dist.DistEnv) or, when None, from the launcher environment (torchrun, deepspeed, srun)."""
    if dist_env is None:
        environ = os.environ if environ is None else environ
        if all(environ.get(var) for var, _ in _TOPOLOGY_VARS):
            # The four standard names (torchrun, or exported by an earlier build_loader) are what Streaming reads.
            return resolve_topology(Topology(*(int(environ[var]) for var, _ in _TOPOLOGY_VARS)))

        dist_env = _detect(environ)
    try:
        topo = Topology(*(int(getattr(dist_env, attr)) for _, attr in _TOPOLOGY_VARS))
    except AttributeError as e:
        raise TypeError(f"dist_env needs rank, world_size, local_rank and local_world_size attributes ({e})") from None
    if not (0 <= topo.rank < topo.world_size and 0 <= topo.local_rank < topo.local_world_size <= topo.world_size):
        raise ValueError(f"inconsistent topology {topo}")
    return topo


def export_topology(topo: Topology, environ=None) -> None:
    """Write the four names Streaming reads. A variable already set to another value is an error (two launchers
    disagreeing must not silently pick one)."""
    environ = os.environ if environ is None else environ
    for var, attr in _TOPOLOGY_VARS:
        want = str(getattr(topo, attr))
        have = environ.get(var)
        if have not in (None, "", want):
            raise ValueError(f"{var}={have} in the environment but the launcher topology says {want}")
        environ[var] = want


# Streaming's segment names (streaming.base.constant.SHM_TO_CLEAN) and ours (dataset.SHARD_CHECK_SHM).
_STREAMING_SHM = ("locals", "barrier", "next_epoch", "cache_usage", "shard_states", "shard_access_times", "resume",
                  "epoch_shape", "epoch_data", "pixart_shard_checks")
_SHM_RE = re.compile(r"^(\d{6})_(" + "|".join(_STREAMING_SHM) + r")$")
_LOCK_RE = re.compile(r"^(\d{6})_(barrier_filelock|cache_filelock)$")


def _mapped_shm_names() -> Optional[set[str]]:
    """Basenames of /dev/shm files mapped by any live process; None if a Python process of ours is unreadable."""
    uid = os.getuid()
    names: set[str] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    i = line.find("/dev/shm/")
                    if i >= 0:
                        names.add(line[i + 9:].split(" (deleted)")[0].strip())
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited while we looked
        except PermissionError:
            # Non-dumpable processes (init, setuid helpers) hide their maps even from their owner. Streaming runs
            # in Python, so only an unreadable Python process of ours leaves the question open.
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().lower()
                if os.stat(f"/proc/{pid}").st_uid == uid and b"python" in cmd:
                    return None
            except OSError:
                pass
    return names


def clean_stale_shm(shm_dir: str = "/dev/shm", lock_dir: Optional[str] = None) -> list[str]:
    """Remove Streaming's shared-memory segments (`/dev/shm/NNNNNN_<name>`) that no live process maps, and the
    /tmp file locks of prefixes left without any segment. Returns the removed paths.

    A crashed run leaves its segments behind (streaming.base.util.clean_stale_shared_memory removes them, but also
    every live run's, breaking other jobs on the machine). A segment is in use exactly when some process maps it,
    which /proc/<pid>/maps tells; only our own files are considered.
    """
    if not os.path.isdir(shm_dir) or not os.path.isdir("/proc"):
        return []
    uid = os.getuid()
    candidates = []
    for name in os.listdir(shm_dir):
        if _SHM_RE.match(name):
            try:
                if os.stat(os.path.join(shm_dir, name)).st_uid == uid:
                    candidates.append(name)
            except FileNotFoundError:
                pass
    mapped = _mapped_shm_names()
    if mapped is None:
        logger.warning("stale shared memory not cleaned: cannot read the memory maps of all our processes")
        return []
    removed = []
    for name in candidates:
        if name not in mapped:
            try:
                os.unlink(os.path.join(shm_dir, name))
                removed.append(os.path.join(shm_dir, name))
            except FileNotFoundError:
                pass
    live_prefixes = {m.group(1) for n in os.listdir(shm_dir) if (m := _SHM_RE.match(n))}
    lock_dir = lock_dir or tempfile.gettempdir()
    for name in os.listdir(lock_dir):
        m = _LOCK_RE.match(name)
        if m and m.group(1) not in live_prefixes:
            path = os.path.join(lock_dir, name)
            try:
                if os.stat(path).st_uid == uid:
                    os.unlink(path)
                    removed.append(path)
            except FileNotFoundError:
                pass
    if removed:
        logger.info("removed %d stale Streaming shared-memory segments / locks", len(removed))
    return removed


# ----------------------------------------------------------------------------------------------------------------
# Streams
# ----------------------------------------------------------------------------------------------------------------


def _bucket_dirs(root: str) -> list[str]:
    """Sub-directories of a multi-scale source that hold a stream (own index.json), in name order."""
    return [os.path.join(root, n) for n in sorted(os.listdir(root)) if has_index(os.path.join(root, n))]


def _first_shard_present(stream_dir: str) -> bool:
    """Whether the shard holding a stream's first sample is in the directory (a remote's cache fills lazily)."""
    for sh in read_index(stream_dir):
        if int(sh["samples"]):
            names = [sh["raw_data"]["basename"]] + ([sh["zip_data"]["basename"]] if sh.get("zip_data") else [])
            return any(os.path.isfile(os.path.join(stream_dir, n)) for n in names)
    return False


def default_cache(remote: str) -> str:
    """The per-node local cache of a remote source that names no `local`."""
    return os.path.join(tempfile.gettempdir(), "pixart_ds_streams", hashlib.sha1(remote.encode()).hexdigest()[:16])


def _bucket_parts(cfg: Config, i: int, src, local: Optional[str]) -> list["_Part"]:
    """The bucket streams of multi-scale source i: from its manifest (manifest.jsonl, written by `pixart-ds
    features`; fetched from the remote into the local cache), or by listing a local directory made before
    manifests existed. Sample counts and latent shapes come from the manifest, so a remote source is planned and
    checked against the recipe before any shard is downloaded."""
    key = f"data.sources[{i}]"
    if src.remote:
        local = local or default_cache(src.remote)
        try:
            man_path = mf.fetch_manifest(src.remote, local)
        except mf.ManifestError as e:
            raise ConfigError(f"{key}.remote: {e}") from None
    else:
        if not local or not os.path.isdir(local):
            raise FileNotFoundError(f"{key}.local: {src.local}: no such directory")
        man_path = mf.local_manifest(local)
    if man_path is None:  # shards written before manifests: list the local bucket streams
        dirs = _bucket_dirs(local)
        if not dirs:
            raise ConfigError(f"{key}.local: {local} has no per-bucket streams (sub-directories with an "
                              f"index.json); was it made with `pixart-ds features --multi-scale`?")
        return [_Part(i, sub, None, num_samples(sub), src.proportion, validate_stream(cfg, sub)) for sub in dirs]

    where = f"{key}.{'remote' if src.remote else 'local'}: {man_path}"
    try:
        man = mf.read_manifest(man_path)
    except mf.ManifestError as e:
        raise ConfigError(f"{key}: {e}") from None
    if not man["multi_scale"]:
        raise ConfigError(f"{where}: single-scale features (one stream); data.multi_scale needs "
                          f"`pixart-ds features --multi-scale`")
    listed = {st["dir"] for st in man["streams"]}
    if not src.remote:
        extra = [os.path.basename(p) for p in _bucket_dirs(local) if os.path.basename(p) not in listed]
        if extra:
            raise ConfigError(f"{where}: the manifest and the shards disagree: {', '.join(extra)} hold a stream the "
                              f"manifest does not list (rerun the same `pixart-ds features` command to rewrite it)")
    parts = []
    for st in sorted(man["streams"], key=lambda st: st["dir"]):  # name order, as listing the directory gives
        sub = os.path.join(local, st["dir"])
        remote = os.path.join(src.remote, st["dir"]) if src.remote else None
        if has_index(sub):
            n = num_samples(sub)
            if n != st["samples"]:
                raise ConfigError(f"{where}: the manifest and the shards disagree: {st['dir']} holds {n} samples, "
                                  f"the manifest says {st['samples']}" + (f" (a stale local cache of "
                                  f"{src.remote}? remove {sub})" if src.remote else ""))
        elif not src.remote:
            raise ConfigError(f"{where}: the manifest and the shards disagree: it lists {st['dir']}, which has no "
                              f"index.json under {local}")
        if src.remote:  # the cache may hold a stream's index but not its shards yet: the manifest's record
            spec = _spec_from_manifest(cfg, man, st, where, sub, remote)
        else:
            spec = validate_stream(cfg, sub)
            if st.get("latent_shape") and list(spec.latent_shape) != list(st["latent_shape"]):
                raise ConfigError(f"{where}: the manifest and the shards disagree: {st['dir']} has "
                                  f"{list(spec.latent_shape)} latents, the manifest says {st['latent_shape']}")
        parts.append(_Part(i, sub, remote, st["samples"], src.proportion, spec))
    if not parts:
        raise ConfigError(f"{where}: the manifest lists no streams")
    return parts


def _spec_from_manifest(cfg: Config, man: dict, st: dict, where: str, local: str, remote: str):
    """validate_stream's checks, on what the manifest records for a stream not downloaded yet."""
    m = cfg.model
    shape = st.get("latent_shape")
    if not (isinstance(shape, list) and len(shape) == 3):
        raise ConfigError(f"{where}: stream {st['dir']} has no latent_shape [C, h, w]")
    c, h, w = (int(x) for x in shape)
    if c != m.in_channels:
        raise ConfigError(f"model.in_channels: {m.in_channels} but {where} records {c}-channel latents")
    if h % m.patch_size or w % m.patch_size:
        raise ConfigError(f"model.patch_size: {m.patch_size} does not divide the {h}x{w} latents of {st['dir']} "
                          f"({where})")
    ls = latent_size(cfg)
    if not 0.5 <= h * w / float(ls * ls) <= 2.0:
        raise ConfigError(f"data.resolution: {cfg.data.resolution} px means ~{ls * ls} latent pixels per bucket but "
                          f"{where} records {h}x{w} for {st['dir']} (buckets made for another resolution)")
    text_dim = None
    if m.condition == "text":
        if man.get("condition") != "text":
            raise ConfigError(f"model.condition: text but {where} records {man.get('condition')!r} features")
        text_dim = man.get("text_dim")
        if text_dim != m.caption_channels:
            raise ConfigError(f"model.caption_channels: {m.caption_channels} but {where} records T5 width "
                              f"{text_dim} (features made with another text encoder)")
    elif man.get("condition") != "class":
        raise ConfigError(f"model.condition: class but {where} records {man.get('condition')!r} features")
    return StreamSpec(local, remote, (c, h, w), text_dim)


@dataclass
class _Part:
    source: int
    path: str
    remote: Optional[str]
    samples: Optional[int]  # None: remote stream not yet downloaded
    weight: Optional[float]  # relative proportion, None = natural size
    spec: Any = None


def plan_streams(cfg: Config, global_micro_batch: int) -> list[_Part]:
    """The streams (one per source, or one per bucket of each source) with their relative weights, validated
    against the recipe. `global_micro_batch` = micro batch x world size (the per_stream batching unit)."""

    d = cfg.data
    if not d.sources:
        raise ConfigError("data.sources: no sources (give at least one feature-shard directory)")
    parts: list[_Part] = []
    for i, src in enumerate(d.sources):
        key = f"data.sources[{i}]"
        local = os.path.abspath(os.path.expanduser(src.local)) if src.local else None
        if d.multi_scale:
            parts.extend(_bucket_parts(cfg, i, src, local))
        else:
            if local and has_index(local) and (not src.remote or _first_shard_present(local)):
                parts.append(_Part(i, local, src.remote, num_samples(local), src.proportion,
                                   validate_stream(cfg, local)))
            elif src.remote:  # a cache holding the index but not (yet) the first shard included
                # Not downloaded yet: the expected shapes come from the recipe and are checked per sample.
                ls = latent_size(cfg)
                spec = StreamSpec(local or src.remote, src.remote, (cfg.model.in_channels, ls, ls),
                                  cfg.model.caption_channels if cfg.model.condition == "text" else None)
                parts.append(_Part(i, local, src.remote, None, src.proportion, spec))
            else:
                raise FileNotFoundError(f"{key}.local: {src.local}: no index.json (not a feature-shard directory)")
    if not d.multi_scale and not all(p.spec.latent_shape == parts[0].spec.latent_shape for p in parts):
        shapes = ", ".join(f"{p.path}: {list(p.spec.latent_shape)}" for p in parts)
        raise ConfigError(f"data.sources: latent shapes differ between sources ({shapes})")

    ncn = d.num_canonical_nodes or DEFAULT_NUM_CANONICAL_NODES
    if d.multi_scale:
        # A bucket must fill one global micro-batch, and (py1e shuffle) give each canonical node a sample.
        parts = _drop_small_buckets(cfg, parts, max(global_micro_batch, ncn if d.shuffle else 1),
                                    shuffle_block_size(cfg) if d.shuffle else None)
    # Relative weights: a source's proportion split over its buckets by their sizes.
    if all(p.weight is not None for p in parts):
        per_source = {}
        for p in parts:
            per_source[p.source] = per_source.get(p.source, 0) + p.samples
        for p in parts:
            if d.multi_scale:
                p.weight = float(d.sources[p.source].proportion) * p.samples / per_source[p.source]
    known = [p.samples for p in parts if p.samples is not None]
    if len(known) == len(parts):
        total = _epoch_estimate(parts)
        if d.shuffle and total < ncn:
            raise ConfigError(f"data.num_canonical_nodes: {ncn} exceeds the {total} samples per epoch of "
                              f"{', '.join(sorted({p.path for p in parts}))} (the shuffle needs one per node)")
        if total < cfg.train.global_batch_size:
            raise ConfigError(f"data.sources: {total} samples per epoch ({', '.join(sorted({p.path for p in parts}))})"
                              f" is fewer than one global batch (train.global_batch_size={cfg.train.global_batch_size})")
    return parts


def _epoch_estimate(parts: list[_Part]) -> int:
    """Samples Streaming draws per epoch: with relative weights the epoch keeps the total size and re-splits it."""
    return int(sum(p.samples for p in parts))


def shuffle_block_size(cfg: Config) -> int:
    """data.shuffle_block_size, or Streaming's own default made explicit (so the order never depends on when it is
    derived): max(4M / num_canonical_nodes, 2^18) samples."""
    ncn = cfg.data.num_canonical_nodes or DEFAULT_NUM_CANONICAL_NODES
    return cfg.data.shuffle_block_size or max(4_000_000 // ncn, 1 << 18)


def _drop_small_buckets(cfg: Config, parts: list[_Part], min_draws: int, block: Optional[int]) -> list[_Part]:
    """Leave out buckets drawing fewer than `min_draws` samples per epoch: per_stream batching needs one full global
    micro-batch per stream, and the py1e shuffle one sample per canonical node. With shuffling, per_stream also gives
    each stream a block of int(block x its share of the epoch) samples, which must not round to 0."""
    d = cfg.data
    weighted = all(p.weight is not None for p in parts)
    while True:
        total = sum(p.samples for p in parts)
        if weighted:
            props = np.array([d.sources[i].proportion for i in sorted({p.source for p in parts})], np.float64)
            src_ids = sorted({p.source for p in parts})
            src_share = {s: float(props[k] / props.sum()) for k, s in enumerate(src_ids)}
            src_n = {s: sum(q.samples for q in parts if q.source == s) for s in src_ids}
            draws = {id(p): total * src_share[p.source] * p.samples / src_n[p.source] for p in parts}
        else:
            draws = {id(p): p.samples for p in parts}
        epoch = sum(draws.values())
        small = [p for p in parts if draws[id(p)] < min_draws or (block and int(block * draws[id(p)] / epoch) < 1)]
        if not small:
            return parts
        logger.warning("multi-scale: leaving out %d bucket stream(s) drawing fewer than %d samples per epoch (one "
                       "global micro-batch, one per canonical node): %s", len(small), min_draws,
                       ", ".join(f"{p.path} ({p.samples})" for p in small))
        parts = [p for p in parts if p not in small]
        missing = set(range(len(d.sources))) - {p.source for p in parts}
        if missing:
            i = min(missing)
            raise ConfigError(f"data.sources[{i}].local: {d.sources[i].local}: no bucket draws the {min_draws} "
                              f"samples per epoch needed for one global micro-batch (micro batch x world size) and "
                              f"one per canonical node")


# ----------------------------------------------------------------------------------------------------------------
# The loader
# ----------------------------------------------------------------------------------------------------------------


def _streaming_loader_class():
    class FeatureLoader(StreamingDataLoader):
        """StreamingDataLoader that also counts corrupt samples replaced on this rank (`num_skipped`).

        `state_dict()` / `load_state_dict()` are Streaming's: {epoch, sample_in_epoch, shuffle_seed,
        num_canonical_nodes, initial_physical_nodes}; load before iterating to continue with exactly the next
        batches.
        """

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.num_skipped = 0
            self._epoch_size = None

        def __iter__(self):
            it = super().__iter__()
            while True:
                error = None
                try:
                    batch = next(it)
                except StopIteration:
                    return
                except CorruptSampleError as e:
                    # From a worker process the message carries the worker's traceback; keep its last line, which
                    # names the shard file and the sample.
                    last = [ln for ln in str(e).splitlines() if ln.strip()][-1]
                    error = last.split("CorruptSampleError: ", 1)[-1]
                    # The re-raised exception and its frames form a cycle holding torch's worker iterator; break it
                    # so the workers shut down now rather than at some later garbage collection, possibly inside
                    # the next loader's forked workers.
                    traceback.clear_frames(e.__traceback__)
                    e.__traceback__ = None
                if error is not None:
                    it.close()
                    raise CorruptSampleError(error)
                self.num_skipped += int(batch["skipped"].sum())
                yield batch

    return FeatureLoader


def build_loader(cfg: Config, micro_batch_size: int, dist_env: Any = None, *, clean_shm: bool = True):
    """A StreamingDataLoader yielding dicts of named tensors (see pixart_ds.data.dataset) in batches of
    `micro_batch_size` per rank.

    Call on every rank, after torch.distributed is initialised (pixart_ds.dist.init_distributed) when the
    world size is above 1. `dist_env`: any object with rank / world_size / local_rank / local_world_size, or None
    to read the launcher's environment. `clean_shm`: remove stale Streaming shared memory first (local rank 0).
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    topo = resolve_topology(dist_env)
    if topo.world_size > 1:
        export_topology(topo)
        if not (tdist.is_available() and tdist.is_initialized()):
            raise RuntimeError(f"build_loader: WORLD_SIZE={topo.world_size} but torch.distributed is not initialised "
                               f"(call pixart_ds.dist.init_distributed first)")
    if clean_shm and topo.local_rank == 0:
        clean_stale_shm()
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()  # nobody creates shared memory before local rank 0 has cleaned

    global_micro = micro_batch_size * topo.world_size
    parts = plan_streams(cfg, global_micro)

    weighted = all(p.weight is not None for p in parts)
    streams = [Stream(local=p.path, remote=p.remote, proportion=p.weight if weighted else None) for p in parts]
    d = cfg.data
    ncn = d.num_canonical_nodes or DEFAULT_NUM_CANONICAL_NODES
    block = shuffle_block_size(cfg)
    ds = FeatureDataset(
        cfg=cfg,
        streams=streams,
        specs=[p.spec for p in parts],
        batch_size=micro_batch_size,  # per device (Streaming partitions by it)
        shuffle=d.shuffle,
        shuffle_algo=d.shuffle_algo,
        shuffle_seed=int(cfg.train.seed),
        shuffle_block_size=block,
        num_canonical_nodes=ncn,
        predownload=d.predownload,
        partition_algo="relaxed",
        sampling_method="balanced",
        batching_method="per_stream" if d.multi_scale else "random",
    )
    for p, n in zip(parts, ds.samples_per_stream):  # remote streams: their index.json is only read now
        if p.samples is not None and int(n) != p.samples:
            raise ConfigError(f"data.sources[{p.source}]: the manifest and the shards disagree: {p.remote or p.path} "
                              f"holds {int(n)} samples, the manifest says {p.samples}"
                              + (f" (a stale local cache? remove {p.path})" if p.remote else ""))
    if ds.epoch_size < cfg.train.global_batch_size:  # remote sources: known only now
        raise ConfigError(f"data.sources: {ds.epoch_size} samples per epoch is fewer than one global batch "
                          f"(train.global_batch_size={cfg.train.global_batch_size})")
    workers = int(d.num_workers)
    loader_cls = _streaming_loader_class()
    return loader_cls(
        ds,
        batch_size=micro_batch_size,
        num_workers=workers,
        drop_last=True,  # every rank yields the same number of full batches; no ragged micro-batch at epoch end
        pin_memory=torch.cuda.is_available() if d.pin_memory is None else bool(d.pin_memory),
        persistent_workers=False,
        prefetch_factor=2 if workers > 0 else None,
    )


@dataclass(frozen=True)
class EpochSize:
    samples: int  # samples all ranks together train on per epoch (= batches_per_rank x micro batch x world size)
    batches_per_rank: int  # micro-batches each rank yields per epoch
    drawn: int  # samples Streaming draws per epoch before batching (after up/down-sampling of sources)


def epoch_size(loader) -> EpochSize:
    """How much one epoch of `loader` holds, computed from Streaming's own partition of epoch 0 (exact: includes
    per-stream batches left incomplete and the rank padding). Cached on the loader."""
    if getattr(loader, "_epoch_size", None) is not None:
        return loader._epoch_size

    ds = loader.dataset
    world = ds._parallel_rank_world.detect_workers()
    work = generate_work(ds.batching_method, ds, world, 0, 0)  # [nodes, ranks, workers, batches, batch]
    mine = work[world.node, world.rank_of_node].reshape(-1, ds.batch_size)
    batches = int((mine >= 0).all(axis=1).sum())
    out = EpochSize(samples=batches * ds.batch_size * world.num_ranks, batches_per_rank=batches,
                    drawn=int(ds.epoch_size))
    loader._epoch_size = out
    return out
