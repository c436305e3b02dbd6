"""`recscore eval`: the baselines table; on MovieLens latest-small, the engine's targets."""
from pathlib import Path

import pytest
from engine_data import build_small

from recscore import bundle
from recscore.cli import main
from recscore.evaluate import evaluate_bundle, format_table

MOVIELENS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-latest-small"
needs_movielens = pytest.mark.skipif(not MOVIELENS.exists(), reason=f"MovieLens not found at {MOVIELENS}")


def test_eval_table_on_synthetic_data(tmp_path, capsys):
    path = build_small(tmp_path / "b")
    table = evaluate_bundle(path, samples=50)
    assert len(table) == 5 and list(table)[0] == "popularity"
    for metrics in table.values():
        for name in ("recall@10", "ndcg@20", "mrr@20", "hit@20"):
            mean, low, high = metrics[name]
            assert 0 <= low <= mean <= high <= 1
    assert "coverage@20" in format_table(table)
    assert main(["eval", str(path), "--bootstrap", "20"]) == 0
    assert "popularity" in capsys.readouterr().out


@needs_movielens
def test_movielens_build_and_eval_targets(tmp_path):
    catalogue, events, malformed = bundle.read_movielens(MOVIELENS)
    manifest = bundle.build(catalogue, events, tmp_path / "ml", value_range=bundle.MOVIELENS_VALUE_RANGE,
                            malformed=malformed, log=lambda *_: None)
    assert manifest["counts"] == {"users": 610, "items": 9742, "events": 100836,
                                  "ease_columns": manifest["counts"]["ease_columns"]}
    table = evaluate_bundle(tmp_path / "ml", samples=100)
    engine_row = next(v for k, v in table.items() if k.startswith("engine"))
    ease_row = next(v for k, v in table.items() if k.startswith("EASE"))
    assert engine_row["ndcg@20"][0] >= 0.15 and engine_row["coverage@20"][0] >= 0.10
    assert engine_row["recall@20"][0] > ease_row["recall@20"][0] > table["popularity"]["recall@20"][0]
