"""The activation knobs: one table reaching ActivationConfig from the CLI and the service, checked
with errors naming the knob, model defaults under explicit values; the competitor (margin) term."""

from __future__ import annotations

import enum
import json
import types

import faiss
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from activeindex.activation import ActivationConfig, activate_batch, compute_targets
from activeindex.activation.competitors import find_competitors
from activeindex.activation.optimize import configure
from activeindex.cli import app
from activeindex.errors import ActivationError
from activeindex.extractors.builtin import BUILTIN_MODELS
from activeindex.extractors.packaged import PACKAGED_MODELS
from activeindex.index import build_index, train_index
from activeindex.knobs import KNOBS, Knob, KnobError, resolve_knobs
from helpers import small_collection  # noqa: E402

runner = CliRunner()
FP32 = {"precision": "fp32"}


def _other_value(knob: Knob):
    """A valid value unlike the knob's default: (as typed by a user, as ActivationConfig holds it)."""
    if issubclass(knob.kind, enum.Enum):
        member = next(m for m in knob.kind if m != knob.default)
        return member.value, member
    if knob.kind is bool:
        return "true", not knob.default
    if knob.nullable:
        return "none", None
    lo = knob.low if knob.low is not None else 0
    hi = knob.high if knob.high is not None else lo + 10
    value = int(lo + 5 + (lo + 5 == knob.default)) if knob.kind is int else lo + (hi - lo) / 7 + 0.125
    assert value != knob.default
    return str(value), value


def _invalid_value(knob: Knob) -> str:
    if issubclass(knob.kind, enum.Enum):
        return "bogus"
    if knob.kind is bool:
        return "maybe"
    return str(knob.high * 2 + 1 if knob.high is not None else knob.low - 1)


NON_BOOL = [k for k in KNOBS.values() if k.kind is not bool]


def test_the_table_is_activation_configs_fields_and_defaults():
    cfg = ActivationConfig()
    for name, knob in KNOBS.items():
        assert getattr(cfg, name) == knob.default, name


@pytest.mark.parametrize("name", list(KNOBS))
def test_invalid_values_are_refused_naming_the_knob(name):
    with pytest.raises(KnobError, match=f"^{name}: "):
        ActivationConfig(**{name: _invalid_value(KNOBS[name])})


def test_model_defaults_apply_and_explicit_values_win():
    ex = types.SimpleNamespace(activation_defaults={"lr": 0.1, "iterations": 20, "margin_weight": 0.5})
    cfg = configure({}, ex)
    assert (cfg.lr, cfg.iterations, cfg.margin_weight) == (0.1, 20, 0.5)
    assert cfg.sources["lr"] == "model" and cfg.sources["scaling"] == "default"
    cfg = configure({"lr": 0.3, "iterations": None}, ex)  # None: not set
    assert (cfg.lr, cfg.iterations) == (0.3, 20) and cfg.sources["lr"] == "user"
    assert configure({}, None).lr == KNOBS["lr"].default
    with pytest.raises(KnobError, match="^lr: "):
        configure({}, types.SimpleNamespace(activation_defaults={"lr": -1.0}))
    with pytest.raises(KnobError, match="unknown knob"):
        resolve_knobs({}, {"learning_rate": 0.1})


@pytest.mark.parametrize("entry", [*BUILTIN_MODELS.values(), *PACKAGED_MODELS.values()], ids=lambda e: e.name)
def test_every_models_defaults_are_valid_knob_values(entry):
    resolved = resolve_knobs({}, entry.activation_defaults)
    ActivationConfig(**resolved.values)


def test_a_model_can_default_to_robust_and_the_user_opt_out():
    """sscd-distilled defaults to robust activation (docs/activation-study.md); --no-robust (robust
    False) wins over it, and evaluate's plain method stays plain for it."""
    from activeindex.cli import _knob_flag
    from activeindex.evaluation.protocol import EvalSettings, Method

    ex = types.SimpleNamespace(activation_defaults=PACKAGED_MODELS["sscd-distilled"].activation_defaults)
    assert configure({}, ex).robust and configure({}, ex).sources["robust"] == "model"
    assert not configure({"robust": False}, ex).robust
    assert not EvalSettings().activation_config(Method.PLAIN, ex).robust
    assert EvalSettings().activation_config(Method.ROBUST, ex).robust
    assert [_knob_flag("robust", True), _knob_flag("robust", False), _knob_flag("lr", 0.1)] == \
        ["--robust", "--no-robust", "--lr 0.1"]


def test_a_builtin_models_defaults_reach_its_extractor(monkeypatch, tiny_extractor):
    from activeindex.extractors import create_extractor

    entry = BUILTIN_MODELS["tiny"]
    monkeypatch.setitem(BUILTIN_MODELS, "tiny", entry.__class__(**{**entry.__dict__, "activation_defaults": {"lr": 0.2}}))
    assert configure({}, create_extractor("builtin:tiny")).lr == 0.2


# -- the command line -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def collection_dir(tmp_path_factory, tiny_extractor, train_vectors, image_dir):
    return small_collection(tmp_path_factory.mktemp("knobs") / "c", tiny_extractor, train_vectors, image_dir,
                            factory="IVF4,PQ8x4", nprobe=1)


@pytest.fixture()
def captured(monkeypatch):
    """add_activated replaced by a recorder of the config it is given."""
    import activeindex.activation.add as add_mod

    seen: list[ActivationConfig] = []

    def fake(coll, paths, out, config, **kwargs):
        seen.append(config)
        report = add_mod.ActivationReport(config=config.record())
        report.added.append((0, "x"))
        return report

    monkeypatch.setattr(add_mod, "add_activated", fake)
    return seen


@pytest.mark.parametrize("name", list(KNOBS))
def test_every_knob_reaches_activation_config_from_the_cli(name, collection_dir, image_dir, tmp_path, captured):
    typed, expected = _other_value(KNOBS[name])
    opt = KNOBS[name].option
    args = [opt] if KNOBS[name].kind is bool else [opt, typed]
    img = sorted(image_dir.glob("*.png"))[20]
    res = runner.invoke(app, ["add", str(collection_dir), str(img), "--activate", "--out", str(tmp_path / "o"), *args])
    assert res.exit_code == 0, (res.output, res.exception)
    (cfg,) = captured
    assert getattr(cfg, name) == expected and cfg.sources[name] == "user"
    others = [k for k in KNOBS if k != name]
    assert all(getattr(cfg, k) == KNOBS[k].default for k in others)  # tiny has no defaults of its own


@pytest.mark.parametrize("name", [k.name for k in NON_BOOL])
def test_invalid_cli_values_name_the_option_before_any_work(name, collection_dir, image_dir, tmp_path, captured):
    img = sorted(image_dir.glob("*.png"))[20]
    res = runner.invoke(app, ["add", str(collection_dir), str(img), "--activate", "--out", str(tmp_path / "o"),
                              KNOBS[name].option, _invalid_value(KNOBS[name])])
    assert res.exit_code != 0 and not captured
    assert KNOBS[name].option in res.output + str(res.exception), (res.output, res.exception)


def test_activation_options_without_activate_are_refused(collection_dir, image_dir):
    res = runner.invoke(app, ["add", str(collection_dir), str(sorted(image_dir.glob("*.png"))[20]), "--lr", "0.1"])
    assert res.exit_code != 0 and "--lr" in str(res.exception) and "--activate" in str(res.exception)


def test_cli_add_records_the_configuration_it_ran(collection_dir, image_dir, tmp_path):
    img = sorted(image_dir.glob("*.png"))[20]
    res = runner.invoke(app, ["add", str(collection_dir), str(img), "--activate", "--out", str(tmp_path / "o"),
                              "--iterations", "2", "--lr", "0.25", "--margin-weight", "1", "--json"])
    assert res.exit_code == 0, (res.output, res.exception)
    act = json.loads(res.stdout)["activation"]
    assert act["lr"] == 0.25 and act["iterations"] == 2 and act["margin_weight"] == 1.0
    assert act["sources"]["lr"] == "user" and act["sources"]["scaling"] == "default"


# -- the service ------------------------------------------------------------------------------

@pytest.fixture()
def service_client(collection_dir, monkeypatch):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from activeindex.service import create_app
    from activeindex.service.state import Service

    seen: list[ActivationConfig] = []

    def fake(self, upload, config):
        seen.append(config)
        raise ActivationError("recorded")  # answered as a refusal: nothing else to check here

    monkeypatch.setattr(Service, "add_activated", fake)
    with TestClient(create_app(collection_dir, token="t"), base_url="http://localhost") as client:
        client.seen = seen
        yield client


def _post(client, image_dir, query: str):
    path = sorted(image_dir.glob("*.png"))[20]
    return client.post(f"/api/images?{query}", files={"file": (path.name, path.read_bytes(), "image/png")},
                       headers={"Authorization": "Bearer t"})


@pytest.mark.parametrize("name", list(KNOBS))
def test_every_knob_reaches_activation_config_from_the_service(name, service_client, image_dir):
    typed, expected = _other_value(KNOBS[name])
    _post(service_client, image_dir, f"activate=true&{name}={typed}")
    (cfg,) = service_client.seen
    assert getattr(cfg, name) == expected and cfg.sources[name] == "user"


@pytest.mark.parametrize("name", list(KNOBS))
def test_invalid_service_values_are_422_naming_the_knob(name, service_client, image_dir):
    r = _post(service_client, image_dir, f"activate=true&{name}={_invalid_value(KNOBS[name])}")
    assert r.status_code == 422 and name in json.dumps(r.json()["detail"]) and not service_client.seen


def test_the_service_documents_every_knob(service_client):
    params = {p["name"] for p in service_client.get("/openapi.json").json()["paths"]["/api/images"]["post"]["parameters"]}
    assert set(KNOBS) <= params


# -- the competitor term ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def crowded(tiny_extractor, train_vectors, image_dir):
    """An IVF4,PQ8x4 index holding 48 images' codes (few cells, coarse codes: crowded) and 8 of them."""
    index = build_index("IVF4,PQ8x4", tiny_extractor.dim)
    train_index(index, train_vectors)
    faiss.extract_index_ivf(index).nprobe = 1
    paths = sorted(image_dir.glob("*.png"))[:48]
    imgs = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    ex = tiny_extractor
    x = ex.features(np.stack([ex.preprocessing.prepare(Image.fromarray(a)) for a in imgs]))
    index.add_with_ids(x, np.arange(len(x), dtype=np.int64))
    return index, imgs[:8], x[:8]


def test_competitor_gaps_are_the_index_score_differences(crowded):
    index, _, x = crowded
    comp = find_competitors(index, x, 4)
    rng = np.random.default_rng(0)
    f = x + 0.05 * rng.normal(size=x.shape).astype(np.float32)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    ivf = faiss.extract_index_ivf(index)
    own = ivf.sa_decode(ivf.sa_encode(x))
    for i in range(len(x)):
        for j in np.flatnonzero(comp.valid[i, :4]):  # code pairs: score = 1 - |f - r|^2 / 2
            r = own[i] + comp.w[i, j]
            direct = (1 - np.sum((f[i] - r) ** 2) / 2) - (1 - np.sum((f[i] - own[i]) ** 2) / 2)
            assert comp.gaps(f)[i, j] == pytest.approx(direct, abs=1e-5)
            assert np.linalg.norm(comp.w[i, j]) > 1e-5  # never the own code


def test_the_margin_term_widens_the_own_codes_lead_over_its_competitors(crowded, tiny_extractor):
    index, imgs, x = crowded
    ex = tiny_extractor
    comp = find_competitors(index, x, 4)
    t = compute_targets(index, x)

    def worst_gap(cfg: ActivationConfig) -> np.ndarray:
        act = activate_batch(ex, imgs, t, cfg, comp)
        released = [np.rint(np.clip(a / 255.0 + p, 0, 1) * 255).astype(np.uint8) for a, p in zip(imgs, act.perturbations)]
        f = ex.features(np.stack([ex.preprocessing.prepare(Image.fromarray(a)) for a in released]))
        return comp.gaps(f).max(axis=1)

    before = comp.gaps(x).max(axis=1)
    paper = worst_gap(ActivationConfig(iterations=10, lr=0.1, psnr=30, stop_cos=None, **FP32))
    margin = worst_gap(ActivationConfig(iterations=10, lr=0.1, psnr=30, stop_cos=None, margin_weight=5.0,
                                        margin=0.05, **FP32))
    assert margin.mean() < before.mean() - 0.01, (before, margin)
    assert margin.mean() < paper.mean(), (paper, margin)


def test_every_knob_reaches_the_evaluation_settings(monkeypatch, tmp_path):
    import activeindex.evaluation as evaluation
    from activeindex.evaluation import Method

    seen = []

    def stop(settings, extractor):
        seen.append(settings)
        raise ActivationError("stop here")

    monkeypatch.setattr(evaluation, "check_settings", stop)
    args, expected = [], {}
    for knob in NON_BOOL:
        typed, expected[knob.name] = _other_value(knob)
        args += [knob.option, typed]
    res = runner.invoke(app, ["evaluate", "--out", str(tmp_path / "e"), "--model", "builtin:tiny", *args])
    assert "stop here" in str(res.exception), (res.output, res.exception)
    cfg = seen[0].activation_config(Method.PLAIN)
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert seen[0].activation_config(Method.ROBUST).robust and not cfg.robust  # the method decides
