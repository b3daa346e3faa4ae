"""The evaluation protocol end to end on tiny data: a DISC21-layout folder and the synthetic source."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from activeindex import metrics
from activeindex.cli import app
from activeindex.datasets.synthetic import write_synthetic_images
from activeindex.edits import paper_edits
from activeindex.evaluation import EvalSettings, Method, evaluate_and_report, synthetic_source
from activeindex.evaluation.sources import SourceError, disc21_source

runner = CliRunner()


@pytest.fixture(scope="module")
def disc21(tmp_path_factory):
    """A DISC21-layout folder: 60 training images, 30 references (10 named by the ground truth),
    20 dev queries of which 10 have no reference."""
    root = tmp_path_factory.mktemp("disc21")
    for folder, prefix, n, start in (("train", "T", 60, 0), ("references", "R", 30, 100), ("dev_queries", "Q", 20, 200)):
        for i, p in enumerate(write_synthetic_images(root / "tmp", n, seed=5, size=(64, 48), start=start)):
            (root / folder).mkdir(exist_ok=True)
            shutil.move(p, root / folder / f"{prefix}{i:06d}.png")
    rows = [(f"Q{i:05d}", f"R{i * 2:06d}" if i < 10 else "") for i in range(20)]
    with open(root / "dev_queries_groundtruth.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("query_id", "reference_id"), *rows])
    for i in range(20):  # query files are named by their query ids
        (root / "dev_queries" / f"Q{i:06d}.png").rename(root / "dev_queries" / f"Q{i:05d}.png")
    return root


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_disc21_source_sets(disc21):
    data = disc21_source(disc21)
    assert [p.stem for p in data.under_test] == [f"R{i * 2:06d}" for i in range(10)]
    assert len(data.distractors) == 20 and not {p.stem for p in data.distractors} & {p.stem for p in data.under_test}
    assert [p.stem for p in data.nonmatching] == [f"Q{i:05d}" for i in range(10, 20)]
    assert len(data.train) == 60 and data.notes == []
    capped = disc21_source(disc21, n_test=4, n_train=50)
    assert len(capped.under_test) == 4 and len(capped.train) == 50
    assert any("images under test: the first 4 of 10" in n for n in capped.notes)


def test_disc21_source_without_queries_holds_out_training_images(disc21, tmp_path):
    root = tmp_path / "d"
    shutil.copytree(disc21, root, ignore=shutil.ignore_patterns("dev_queries"))
    data = disc21_source(root, n_nonmatch=8)
    assert len(data.nonmatching) == 8 and len(data.train) == 52
    assert not set(data.nonmatching) & set(data.train) and "held-out training images" in data.notes[0]


def test_disc21_source_errors(disc21, tmp_path):
    with pytest.raises(SourceError, match="no ground-truth CSV"):
        disc21_source(tmp_path)
    bad = tmp_path / "gt.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(SourceError, match="query_id,reference_id"):
        disc21_source(disc21, ground_truth=bad)
    missing = tmp_path / "gt2.csv"
    missing.write_text("query_id,reference_id\nQ1,R999999\n")
    with pytest.raises(SourceError, match="not in"):
        disc21_source(disc21, ground_truth=missing)


def test_evaluate_cli_on_a_disc21_folder(disc21, tmp_path):
    out = tmp_path / "eval"
    res = runner.invoke(app, ["evaluate", "--disc21", str(disc21), "--out", str(out), "--model", "builtin:tiny",
                              "--index", "Flat", "--index", "IVF4,PQ4x4", "--methods", "passive,plain"])
    assert res.exit_code == 0, (res.output, res.exception)
    assert "| Flat | passive |" in res.stdout and "| **mean** |" in res.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"train": 60, "distractors": 20, "under_test": 10, "nonmatching": 10}
    assert summary["settings"]["factories"] == ["Flat", "IVF4,PQ4x4"] and summary["settings"]["nprobe"] == 1
    assert len(summary["results"]) == 4

    retr = read_csv(out / "retr_df.csv")
    assert len(retr) == 2 * 2 * 14 * 10  # factories × methods × edits × images
    for col in ("batch", "image_index", "attack", "attack_param", "retrieved_distances", "retrieved_indices",
                "rank", "r@1", "r@10", "r@100", "ap", "index", "method"):
        assert col in retr[0]
    # Unedited originals are found first by exact search: the pipeline is wired to the right ids.
    ident = [r for r in retr if r["index"] == "Flat" and r["method"] == "passive" and r["attack"] == "identity"]
    assert all(r["rank"] == "0" for r in ident)
    # The same edit draw for every method.
    by = {(r["index"], r["method"], r["image_index"], r["attack"]): r["attack_param"] for r in retr}
    for (f, m, i, a), p in by.items():
        assert by[(f, "passive", i, a)] == p

    icd = read_csv(out / "icd_df.csv")
    assert len(icd) == 4 * 20 and sum(r["image_index"] == "-1" for r in icd) == 40
    # The written ISC-format files (predictions + ground_truth.csv) give back every metric of the
    # summary: what a reviewer recomputes with the ISC21 tooling is what the report shows.
    gt_rows = read_csv(out / "predictions" / "ground_truth.csv")
    assert set(gt_rows[0]) == {"query_id", "reference_id"} and len(gt_rows) == 20
    gt = [(g["query_id"], g["reference_id"]) for g in gt_rows if g["reference_id"]]
    assert gt == [(f"pos{i:06d}", f"R{i * 2:06d}") for i in range(10)]  # ISC ids: file stems
    for key, r in summary["results"].items():
        stem = f"{r['factory'].replace(',', '_')}__{r['method']}"
        preds = read_csv(out / "predictions" / f"{stem}.csv")
        assert set(preds[0]) == {"query_id", "reference_id", "score"}
        triples = ([p["query_id"] for p in preds], [p["reference_id"] for p in preds], [float(p["score"]) for p in preds])
        m = metrics.evaluate(triples, gt)
        assert (m.uap, m.recall_at_p90, m.recall_at_1, m.recall_at_10) == (
            r["uap"], r["recall_at_p90"], r["icd_recall_at_1"], r["icd_recall_at_10"])
        # Scores are float32; the file's 9 digits give the same float32 back.
        assert (m.threshold_at_p90 is None) == (r["threshold_at_p90"] is None)
        if m.threshold_at_p90 is not None:
            assert np.float32(m.threshold_at_p90) == np.float32(r["threshold_at_p90"])
        raw = read_csv(out / "predictions" / f"{stem}__raw.csv")
        assert metrics.micro_average_precision(
            ([p["query_id"] for p in raw], [p["reference_id"] for p in raw], [float(p["score"]) for p in raw]), gt
        ) == r["uap_raw"]
        lo, hi = r["intervals"]["uap"]
        assert lo <= r["uap"] <= hi and r["n_images"] == 10
        lo, hi = r["intervals"]["r@1"]["mean"]
        assert lo <= r["r@1"]["mean"] <= hi
        at = r["at_calibrated_threshold"]
        assert at["threshold"] is None or (0 <= at["fpr"] <= 1 and "unrelated images" in at["copy_decision"])
        if r["method"] == "plain":
            assert r["release"]["psnr_min"] >= 42.0
            g = r["gain_over_passive"]["r@1"]
            passive = summary["results"][key.replace("plain", "passive")]
            assert g["gain"] == pytest.approx(r["r@1"]["mean"] - passive["r@1"]["mean"])
            assert g["interval"][0] <= g["gain"] <= g["interval"][1]
    report = (out / "report.html").read_text()
    assert report.count("data:image/png;base64,") >= 3 and "R@1 per edit" in report
    assert "http://" not in report and "https://" not in report  # self-contained
    assert "name='viewport'" in report and "<dt>plain</dt>" in report and "ground_truth.csv" in report
    assert "{'train'" not in report and "<td>60</td>" in report  # set counts as a table, not a dict


def test_activation_moves_copies_towards_their_originals(tmp_path, tiny_extractor):
    data = synthetic_source(tmp_path / "img", n_train=80, n_refs=60, n_test=12, n_nonmatch=12, size=64, workers=1)
    settings = EvalSettings(factories=("IVF4,PQ8x4",), methods=(Method.PASSIVE, Method.PLAIN), examples=2)
    results, summary, _ = evaluate_and_report(data, tiny_extractor, settings, tmp_path / "out")
    passive, plain = results
    assert plain.summary["release"]["cos_after_mean"] > plain.summary["release"]["cos_before_mean"]
    assert plain.summary["r@1"]["identity"] >= passive.summary["r@1"]["identity"]
    assert set(passive.summary["r@1"]) == {*paper_edits(), "mean"}
    assert len(plain.examples) == 2 and not np.array_equal(plain.examples[0], passive.examples[0])
    # Resumed from its checkpoints, the evaluation reports the same figures, the paired gain included.
    lines: list[str] = []
    _, again, _ = evaluate_and_report(data, tiny_extractor, settings, tmp_path / "out", log=lines.append)
    assert any("resuming: 2 of 2" in ln for ln in lines)
    assert "gain_over_passive" in again["results"]["IVF4,PQ8x4 | plain"]
    assert again["results"] == summary["results"]


def test_evaluate_refuses_bad_settings_before_any_work(tmp_path):
    res = runner.invoke(app, ["evaluate", "--out", str(tmp_path), "--methods", "passive,wild"])
    assert res.exit_code != 0 and "--methods" in str(res.exception)


def test_evaluation_resumes_after_finished_runs(tmp_path, tiny_extractor, monkeypatch):
    from activeindex.evaluation import protocol

    data = synthetic_source(tmp_path / "img", n_train=60, n_refs=30, n_test=8, n_nonmatch=8, size=48, workers=1)
    settings = EvalSettings(factories=("Flat", "IVF2,Flat"), methods=(Method.PASSIVE,))
    _, first, _ = evaluate_and_report(data, tiny_extractor, settings, tmp_path / "out")
    # Simulate a crash after the first factory: its checkpoint stays, the second one is lost.
    (tmp_path / "out" / "checkpoints" / "IVF2_Flat__passive.npz").unlink()
    calls = []
    real = protocol.evaluate_run
    monkeypatch.setattr(protocol, "evaluate_run", lambda coll, *a, **k: calls.append(a[3]) or real(coll, *a, **k))
    lines = []
    _, again, _ = evaluate_and_report(data, tiny_extractor, settings, tmp_path / "out", log=lines.append)
    assert calls == ["IVF2,Flat"] and any("resuming: 1 of 2" in ln for ln in lines)
    assert again["results"] == first["results"]
    # Another setting is another experiment: nothing is reused.
    calls.clear()
    evaluate_and_report(data, tiny_extractor, EvalSettings(factories=("Flat",), methods=(Method.PASSIVE,), k=50),
                        tmp_path / "out")
    assert calls == ["Flat"]


def test_unreadable_images_are_left_out_and_said(disc21, tmp_path, tiny_extractor):
    root = tmp_path / "d"
    shutil.copytree(disc21, root)
    (root / "references" / "R999999.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (root / "dev_queries" / "Q00015.png").write_bytes(b"")  # a non-matching query, empty
    settings = EvalSettings(factories=("Flat",), methods=(Method.PASSIVE,))
    results, summary, _ = evaluate_and_report(disc21_source(root), tiny_extractor, settings, tmp_path / "out")
    notes = " ".join(summary["notes"])
    assert "distractors: 1 unreadable images left out" in notes and "R999999.png" in notes
    assert "non-matching queries: 1 unreadable images left out" in notes
    assert summary["results"]["Flat | passive"]["n_nonmatching_queries"] == 9
    assert results[0].summary["r@1"]["identity"] == 1.0


def test_checkpoints_are_never_unpickled(tmp_path):
    import io
    import pickle

    from activeindex.evaluation import protocol

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    blob = pickle.dumps({"key": "k", "run": Payload(), "factory": {}})
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "Flat__passive.pkl").write_bytes(blob)  # the old format's name
    buf = io.BytesIO()
    np.savez(buf, meta=np.array([Payload()], dtype=object))  # an object array is a pickle too
    (tmp_path / "checkpoints" / "Flat__passive.npz").write_bytes(buf.getvalue())
    assert protocol.load_checkpoint(tmp_path, "Flat", Method.PASSIVE, "k") is None
    assert not marker.exists()


def test_a_checkpoint_is_not_reused_under_other_model_defaults(tiny_extractor, monkeypatch):
    """The run key covers the activation as it resolves: a model whose own defaults changed (a new
    version's tuning) gets a new key, so its old activated runs are recomputed, not reused."""
    from types import SimpleNamespace

    from activeindex.evaluation import protocol

    data = SimpleNamespace(train=["t0"], distractors=["d0"], under_test=["u0"], nonmatching=["n0"])
    settings = EvalSettings(factories=("Flat",), methods=("passive", "plain"))
    key = protocol.run_key(data, tiny_extractor, settings)
    assert protocol.run_key(data, tiny_extractor, settings) == key
    monkeypatch.setattr(tiny_extractor, "activation_defaults", {"lr": 0.5}, raising=False)
    assert protocol.run_key(data, tiny_extractor, settings) != key
