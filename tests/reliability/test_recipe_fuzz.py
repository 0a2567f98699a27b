"""Recipe fuzz (hypothesis): mutated recipes fed to config.from_dict / config.load (files and command-line overrides)
and, when they load, to the first things the trainer derives from a recipe before any training: its input checks
(trainer.check_inputs), the batch plan at 1 and 2 ranks, the latent size and positional-embedding scale, the noise
schedule, and the AdamW optimizer DeepSpeed builds from train.lr / adam_betas / adam_eps / weight_decay.

Mutations: wrong types, unknown keys, deleted keys, out-of-range and non-finite numbers, swapped sections, sections
replaced by scalars or lists, random YAML documents, random overrides. Every recipe either loads and passes those
steps, or fails with one line (ConfigError / ValueError / FileNotFoundError) that names the key (`source: key: what`)
or, for a document that is not a mapping at all, the file -- never a traceback from deep inside torch or DeepSpeed.

Deterministic (derandomized) so CI is stable; PIXART_DS_FUZZ_EXAMPLES=N explores more (randomly) on demand.
"""
import copy
import dataclasses
import datetime
import glob
import os
import re
import typing

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pixart_ds.testing import REPO, TINY_CLASS, TINY_TEXT

from .faults import SUMMARY, count

C = pytest.importorskip("pixart_ds.config")

EXAMPLES = int(os.environ.get("PIXART_DS_FUZZ_EXAMPLES", "200"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize="PIXART_DS_FUZZ_EXAMPLES" not in os.environ,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
                    database=None)

BASES = [TINY_TEXT, TINY_CLASS] + sorted(glob.glob(os.path.join(REPO, "recipes", "*.yaml")))


def _schema_keys(cls=C.Config, prefix="") -> set[str]:
    keys = set()
    for f in dataclasses.fields(cls):
        path = prefix + f.name
        keys.add(path)
        tp = typing.get_type_hints(cls)[f.name]
        args = typing.get_args(tp)
        inner = next((a for a in (tp, *args) if dataclasses.is_dataclass(a)), None)
        if inner is not None:
            keys |= _schema_keys(inner, path + ".")
    return keys


KEYS = _schema_keys()
LEAF_KEYS = sorted(k for k in KEYS if not any(o.startswith(k + ".") for o in KEYS))
FILE_LEVEL = ("not valid YAML", "must be a mapping at top level", "recipe file not found",
              "an override must look like key.path=value")
_STATS = {"loaded": 0, "rejected": 0, "preflight_rejected": 0}


def _names_a_key(msg: str) -> bool:
    if "unknown key" in msg:  # "<src>: a.b.c: unknown key (did you mean ...?)": the path is the injected one
        return True
    for part in msg.split(": "):
        if re.sub(r"\[\d+\]", "", part.strip()) in KEYS:
            return True
    return False


def _check_error(e: BaseException) -> None:
    msg = str(e)
    assert isinstance(e, (ValueError, FileNotFoundError)), f"{type(e).__name__}: {msg}"
    assert "\n" not in msg.strip(), f"not one line: {msg!r}"
    assert _names_a_key(msg) or any(s in msg for s in FILE_LEVEL), f"names no key: {msg}"


def _preflight(cfg) -> None:
    import torch

    from pixart_ds.diffusion.schedule import Schedule
    from pixart_ds.train.state import noise_generator as _noise_generator
    from pixart_ds.train.trainer import check_inputs

    check_inputs(cfg)
    for world in (1, 2):
        try:
            micro, accum = C.batch_plan(cfg, world)
        except C.ConfigError as e:  # a global batch that does not divide: legitimate, must name the key
            _check_error(e)
            continue
        assert micro >= 1 and accum >= 1 and micro * accum * world == cfg.train.global_batch_size
    assert C.latent_size(cfg) >= 1 and C.pe_interpolation(cfg) > 0
    sched = Schedule.from_config(cfg.diffusion)
    assert torch.isfinite(sched.betas).all()
    t = cfg.train
    p = torch.nn.Parameter(torch.zeros(1))
    torch.optim.AdamW([p], lr=C.effective_lr(cfg), betas=tuple(t.adam_betas), eps=t.adam_eps,
                      weight_decay=t.weight_decay)
    datetime.timedelta(seconds=t.collective_timeout_s)  # dist.init_distributed
    for rank in (0, 63):  # the per-rank noise stream seeded from train.seed
        _noise_generator(cfg, rank, torch.device("cpu"))


def _attempt(load) -> None:
    try:
        cfg = load()
    except Exception as e:  # noqa: BLE001 - the property is about which exceptions
        _check_error(e)
        _STATS["rejected"] += 1
        return
    try:
        _preflight(cfg)
    except Exception as e:  # noqa: BLE001
        _check_error(e)
        _STATS["preflight_rejected"] += 1
        return
    _STATS["loaded"] += 1


# ----------------------------------------------------------------------------------------------------------------
# Strategies
# ----------------------------------------------------------------------------------------------------------------

_base_docs = [yaml.safe_load(open(p)) for p in BASES]

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from([0, -1, 1, 3, 7, 2**31, 1e308, -1e-9, 1e-30, 0.5, 1.5, "1e-4", "nan", "inf", "-inf", "", "auto",
                     "none", "bf16", "class", "PixArt-XL/2", "tiny"]),
)
_numbers = st.one_of(st.sampled_from([0, -1, 1, 2, 3, 0.0, -0.5, 0.5, 0.999, 1.0, 1.5, 1e-30, 2**31, 2**63, 2**64,
                                     float("nan"), float("inf"), float("-inf")]),
                     st.integers(min_value=-(2**66), max_value=2**66), st.floats())
_values = st.one_of(_scalars, st.lists(_scalars, max_size=3), st.dictionaries(st.text(max_size=6), _scalars,
                                                                              max_size=2))
_idents = st.from_regex(r"[a-z_][a-z0-9_]{0,12}", fullmatch=True)


def _paths(doc, prefix=()):
    """Every (path tuple) in a YAML document: dict keys and list indices."""
    out = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.append(prefix + (k,))
            out += _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out.append(prefix + (i,))
            out += _paths(v, prefix + (i,))
    return out


def _parent(doc, path):
    for p in path[:-1]:
        doc = doc[p]
    return doc


@st.composite
def mutated_recipes(draw):
    doc = copy.deepcopy(draw(st.sampled_from(_base_docs)))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(doc)
        kind = draw(st.sampled_from(["set", "schema", "schema", "unknown", "delete", "swap", "section"]))
        if kind == "schema":  # any key of the schema, also those the base recipe leaves at their defaults
            *sections, leaf = draw(st.sampled_from(LEAF_KEYS)).split(".")
            target = doc
            for sec in sections:
                if not isinstance(target.get(sec), dict):
                    target[sec] = {}
                target = target[sec]
            target[leaf] = draw(st.one_of(_numbers, _values))
        elif kind in ("set", "delete") and paths:
            path = draw(st.sampled_from(paths))
            parent = _parent(doc, path)
            if kind == "set":
                parent[path[-1]] = draw(_values)
            elif isinstance(parent, dict):
                del parent[path[-1]]
            else:
                parent.pop(path[-1])
        elif kind == "unknown":
            dicts = [()] + [p for p in paths if isinstance(_parent(doc, p + (None,)), dict)]
            where = draw(st.sampled_from(dicts))
            target = _parent(doc, where + (None,))
            target[draw(st.one_of(_idents, st.text(max_size=8), st.integers()))] = draw(_values)
        elif kind == "swap":
            sections = [k for k, v in doc.items() if isinstance(v, dict)]
            if len(sections) >= 2:
                a, b = draw(st.permutations(sections))[:2]
                doc[a], doc[b] = doc[b], doc[a]
        elif kind == "section":
            sections = [k for k, v in doc.items() if isinstance(v, dict)] or ["model"]
            doc[draw(st.sampled_from(sections))] = draw(_scalars | st.lists(_scalars, max_size=2))
    return doc


_override_keys = st.one_of(st.sampled_from(sorted(KEYS)), _idents, st.text(max_size=10))
_override_values = st.one_of(st.text(max_size=12), st.sampled_from(
    ["0", "-1", "nan", "inf", "1e-4", "[1, 2]", "{a: 1}", "null", "true", "[{local: /x}]", "'", "[", "{"]))


# ----------------------------------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------------------------------


def test_every_base_recipe_loads_and_passes_the_preflight():
    """The unmutated recipes load; the preflight may only refuse encoders or init_from paths missing on this machine
    (the stage recipes name models/ folders), and then names the key."""
    for path in BASES:
        cfg = C.load(path)
        try:
            _preflight(cfg)
        except FileNotFoundError as e:
            _check_error(e)
            assert str(e).startswith(("encoders.", "train.init_from")), e


_EDGES = [0, -1, 1, 2**31, 2**63, 2**66, -(2**63), 0.0, -0.5, 0.999, 1.0, 1e-30, 1e308, float("nan"), float("inf"),
          float("-inf")]


@pytest.mark.parametrize("key", LEAF_KEYS)
def test_every_key_at_its_edges_loads_or_names_the_key(key):
    """Systematic companion of the random mutations: every schema key of the tiny recipe set to boundary numbers."""
    base = _base_docs[0]
    for value in _EDGES + ["", "x", None, [], {}, True]:
        doc = copy.deepcopy(base)
        *sections, leaf = key.split(".")
        target = doc
        for sec in sections:
            target = target.setdefault(sec, {}) if isinstance(target.get(sec, {}), dict) else target
        if sections == ["data", "sources"]:
            target = doc["data"]["sources"][0]
        target[leaf] = value
        _attempt(lambda: C.from_dict(doc, "fuzz.yaml"))
        count("recipes_fuzzed", 1)


@SETTINGS
@given(doc=mutated_recipes())
def test_mutated_recipes_load_or_name_the_key(doc):
    _attempt(lambda: C.from_dict(doc, "fuzz.yaml"))
    count("recipes_fuzzed", 1)


@SETTINGS
@given(text=st.one_of(st.text(max_size=200), mutated_recipes().map(lambda d: yaml.safe_dump(d)[:-7])))
def test_random_yaml_documents_load_or_name_the_file_or_key(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "r.yaml"
    path.write_text(text)
    _attempt(lambda: C.load(str(path)))
    count("recipes_fuzzed", 1)


@SETTINGS
@given(pairs=st.lists(st.tuples(_override_keys, _override_values), min_size=1, max_size=3),
       base=st.sampled_from([TINY_TEXT, TINY_CLASS]))
def test_random_overrides_load_or_name_the_key(pairs, base):
    _attempt(lambda: C.load(base, [f"{k}={v}" for k, v in pairs]))
    count("recipes_fuzzed", 1)


def test_fuzz_figures():
    """Runs last in this module: the share of mutations that still loaded (both outcomes must occur)."""
    assert _STATS["rejected"] > 0 and _STATS["loaded"] > 0, _STATS
    SUMMARY["tests"]["recipe_fuzz"] = dict(_STATS)
