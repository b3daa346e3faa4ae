from __future__ import annotations

from activeindex.edits import paper_edits, paper_extra_edits
from activeindex.evaluation.descriptor_eval import (
    EvalConfig,
    evaluate_descriptors,
    extractor_describer,
    markdown_table,
    phash_describer,
)


def test_protocol_runs_all_edits_for_every_method(tiny_extractor):
    cfg = EvalConfig(n_originals=6, n_distractors=20, n_nonmatching=6, size=64, k=5)
    methods = {"tiny": extractor_describer(tiny_extractor), "phash": phash_describer()}
    results = evaluate_descriptors(methods, cfg, progress=False)
    assert list(results) == [*paper_edits(), *paper_extra_edits()]
    for label, per_method in results.items():
        assert set(per_method) == {"tiny", "phash"}
        for r in per_method.values():
            assert 0.0 <= r["R@1"] <= 1.0 and 0.0 <= r["uAP"] <= 1.0
    # An unedited copy is its own nearest neighbour for any descriptor.
    assert results["identity"]["tiny"]["R@1"] == 1.0 and results["identity"]["phash"]["R@1"] == 1.0
    table = markdown_table(results, mean_over=list(paper_edits()))
    assert "| JPEG 50 |" in table and "mean of the 14 table edits" in table
