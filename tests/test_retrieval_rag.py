"""Grounded answers: the prompt numbers the sources, fits the context, and nothing relevant
is said plainly without running the model; `press serve --index` grounds chat completions;
`press ask` with the real MiniLM and SmolLM2 cites numbered sources."""

import http.client
import json
import threading

import jax
import pytest

from compress.formats import registry
from compress.models import decoder
from compress.formats.tokenizer import load_tokenizer
from retrieval.chunking import ChunkingConfig
from retrieval.documents import read_documents
from retrieval.encoder import SentenceEncoder
from serve.rag import EMPTY_INDEX, MIN_SCORE, NOTHING_FOUND, SYSTEM_PROMPT, RagPipeline, citations
from retrieval.retriever import Retriever
from serve.cli import main
from serve.engine import Engine
from serve.sampling import SamplingParams
from serve.server import make_server
from tests.tiny_retrieval import save_tiny_encoder, write_corpus

SHORT = SamplingParams(max_new_tokens=6)


@pytest.fixture(scope="module")
def tiny_engine():
    """A random 2-layer decoder with SmolLM2's tokenizer and chat template: real prompts, fast steps."""
    tokenizer = load_tokenizer(registry.resolve("smollm2-135m-instruct"))
    config = decoder.DecoderConfig(vocab_size=len(tokenizer), embed_dim=32, mlp_dim=64, num_layers=2, num_heads=4,
                                   num_kv_heads=2, head_dim=8, eos_token_ids=(tokenizer.eos_token_id,))
    params = decoder.init_params(config, jax.random.PRNGKey(0))
    with Engine(params, config, tokenizer, max_slots=2, max_seq_len=1024, name="tiny", compilation_cache=False) as e:
        yield e


@pytest.fixture(scope="module")
def retriever(tmp_path_factory):
    encoder = SentenceEncoder.from_dir(save_tiny_encoder(str(tmp_path_factory.mktemp("encoder"))), batch_size=8)
    root = write_corpus(str(tmp_path_factory.mktemp("docs")))
    r = Retriever(encoder, chunking=ChunkingConfig(chunk_tokens=48, overlap=8))
    r.add(read_documents([root], root=root))
    return r


def test_citations_are_numbers_in_range_in_first_cited_order():
    assert citations("As [2] says, and [1], [2] and [7] too; [x] [0]", 3) == (2, 1)
    assert citations("no citations", 3) == ()


def test_prompt_numbers_the_sources_in_rank_order(retriever, tiny_engine):
    pipeline = RagPipeline(retriever, tiny_engine, k=3, min_score=-1.0)
    question = "Tomatoes need full sun"
    grounding = pipeline.ground([{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}])
    hits = retriever.search(question, 3)
    assert grounding.found and [s.hit.key for s in grounding.sources] == [h.key for h in hits]
    assert [s.number for s in grounding.sources] == [1, 2, 3]
    system, user = grounding.messages
    assert system == {"role": "system", "content": SYSTEM_PROMPT + "\n\nBe brief."}
    assert user["role"] == "user" and user["content"].endswith(f"Question: {question}")
    for s in grounding.sources:  # each source headed by its number and location, then its text
        head = f"[{s.number}] ({s.hit.source}{' > ' + s.hit.heading if s.hit.heading else ''})\n{s.hit.text.strip()}"
        assert head in user["content"]
    assert user["content"].index("[1] (") < user["content"].index("[2] (") < user["content"].index("[3] (")


def test_sources_are_dropped_until_the_prompt_fits(retriever, tiny_engine):
    pipeline = RagPipeline(retriever, tiny_engine, k=6, min_score=-1.0)
    question = [{"role": "user", "content": "bicycle chain"}]
    roomy = pipeline.ground(question, max_new_tokens=8)
    assert len(roomy.sources) == 6
    # Ask for so many new tokens that the last two sources no longer fit.
    two_last = len(tiny_engine.encode(roomy.messages)) - len(tiny_engine.encode(
        pipeline.ground(question, k=4, max_new_tokens=8).messages))
    budget = tiny_engine.max_seq_len - len(tiny_engine.encode(roomy.messages)) + two_last - 1
    tight = pipeline.ground(question, max_new_tokens=budget)
    assert [s.hit.key for s in tight.sources] == [s.hit.key for s in roomy.sources[:4]]
    assert len(tiny_engine.encode(tight.messages)) + budget <= tiny_engine.max_seq_len
    with pytest.raises(ValueError, match="cannot hold the question"):
        pipeline.ground(question, max_new_tokens=tiny_engine.max_seq_len)


def test_a_question_the_context_cannot_hold_is_refused_before_retrieval(retriever, tiny_engine, monkeypatch):
    # A 7.8 MB question spent 11.8 s in the encoder's tokenizer before the engine refused it.
    searched = []
    monkeypatch.setattr(retriever, "search", lambda *args, **kwargs: searched.append(args))
    pipeline = RagPipeline(retriever, tiny_engine, min_score=-1.0)
    huge = "bicycle chain " * (tiny_engine.max_seq_len * 5)  # 14 characters a word: beyond 64 a token
    with pytest.raises(ValueError, match=r"^the question: 71680 characters, more than the engine's context of 1024"):
        pipeline.ground([{"role": "user", "content": huge}])
    assert searched == []


def test_answer_generates_from_numbered_sources(retriever, tiny_engine):
    pipeline = RagPipeline(retriever, tiny_engine, k=2, min_score=-1.0)
    answer = pipeline.answer("Why does sourdough rise slowly?", sampling=SHORT)
    assert answer.found and [s.number for s in answer.sources] == [1, 2]
    assert answer.cited == citations(answer.text, 2) and answer.finish_reason in ("length", "stop")
    grounding = pipeline.ground([{"role": "user", "content": answer.question}], max_new_tokens=6)
    want = tiny_engine.generate(grounding.messages, SHORT)[0].text.strip()  # greedy: the same text
    assert answer.text == want
    as_json = answer.to_json()
    assert [s["number"] for s in as_json["sources"]] == [1, 2] and "location" in as_json["sources"][0]


def test_nothing_relevant_is_said_plainly_without_running_the_model(retriever, tiny_engine):
    prefills = tiny_engine.stats["prefills"]
    strict = RagPipeline(retriever, tiny_engine, min_score=1.01)  # no cosine similarity reaches it
    answer = strict.answer("What is the capital of Peru?", sampling=SHORT)
    assert not answer.found and answer.sources == () and answer.finish_reason == "no_sources"
    assert answer.text.startswith(NOTHING_FOUND) and "below the relevance threshold 1.01" in answer.text
    empty = RagPipeline(Retriever(retriever.encoder), tiny_engine).answer("Anything?", sampling=SHORT)
    assert empty.text == EMPTY_INDEX and not empty.found
    assert tiny_engine.stats["prefills"] == prefills  # the model never ran
    grounding = strict.ground([{"role": "user", "content": "What is the capital of Peru?"}])
    assert not grounding.found and "No source in the index is relevant" in grounding.messages[-1]["content"]


def _post(server, path, body):
    conn = http.client.HTTPConnection(*server.server_address, timeout=300)
    conn.request("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    response = conn.getresponse()
    data = json.loads(response.read())
    conn.close()
    return response.status, data


def test_server_grounds_chat_completions_in_the_index(retriever, tiny_engine):
    pipeline = RagPipeline(retriever, tiny_engine, k=2, min_score=-1.0)
    server = make_server(tiny_engine, rag=pipeline)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        messages = [{"role": "user", "content": "How often should I check tyre pressure?"}]
        status, body = _post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 4})
        assert status == 200, body
        grounding = pipeline.ground(messages, max_new_tokens=4)
        assert [s["number"] for s in body["sources"]] == [1, 2]
        assert [s["key"] for s in body["sources"]] == [s.hit.key for s in grounding.sources]
        # The model was given the grounded prompt, not the bare question.
        assert body["usage"]["prompt_tokens"] == len(tiny_engine.encode(grounding.messages))
        assert body["usage"]["prompt_tokens"] > len(tiny_engine.encode(messages)) + 40
        status, body = _post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 2})
        assert status == 200 and "sources" not in body  # plain completions are left alone
        status, body = _post(server, "/v1/chat/completions", {"messages": [{"role": "system", "content": "x"}]})
        assert status == 400 and body["error"]["param"] == "messages"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# --- the real models

FACTS = {
    "docs/festival.md": "# The Quellton lantern festival\n\nThe lantern festival of Quellton is held every year on "
                        "the first Saturday of March. Families float paper lanterns down the river Vell.\n",
    "docs/zimbo.md": "# The Zimbo programming language\n\nZimbo is a small language for robots. Its loops are "
                     "written with the keyword `spin`, and every program ends with `halt`.\n",
    "docs/tea.txt": "Tea storage\n===========\n\nKeep green tea in an airtight tin away from light; it loses "
                    "its flavour within six months once opened.\n",
    "docs/ferry.jsonl": json.dumps({"id": "ferry", "text": "The ferry from Quellton to Sarn Island leaves at "
                                    "7:40 every morning and takes ninety minutes.", "route": "Q-S"}) + "\n",
}


@pytest.mark.slow
def test_press_ask_cites_numbered_sources(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_corpus(str(tmp_path), FACTS)
    assert main(["index", "build", "--docs", "docs", "--index", "idx", "--no-progress"]) == 0
    capsys.readouterr()
    code = main(["ask", "--index", "idx", "--model", "smollm2-135m-instruct", "-k", "3", "--max-new-tokens", "48",
                 "When is the lantern festival of Quellton held?"])
    out = capsys.readouterr().out
    assert code == 0
    answer, _, sources = out.partition("\nSources:\n")
    assert answer.strip() and not answer.startswith(NOTHING_FOUND)
    lines = sources.strip().splitlines()
    assert [line[:4] for line in lines] == ["[1] ", "[2] ", "[3] "][: len(lines)] and lines
    assert lines[0].startswith("[1] docs/festival.md > The Quellton lantern festival, chars 0-")

    code = main(["ask", "--index", "idx", "--model", "smollm2-135m-instruct",
                 "What is the best recipe for a chocolate cake?"])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith(NOTHING_FOUND) and "Sources:" not in out


@pytest.mark.slow
def test_relevance_threshold_separates_related_from_unrelated_questions(tmp_path):
    write_corpus(str(tmp_path), FACTS)
    retriever = Retriever(SentenceEncoder.from_pretrained("all-minilm-l6-v2"))
    retriever.add(read_documents([str(tmp_path / "docs")], root=str(tmp_path)))
    related = ["What day is the Quellton lantern festival?", "How do I write a loop in Zimbo?",
               "How long does opened green tea keep its flavour?", "When does the ferry to Sarn Island leave?"]
    unrelated = ["What is the best recipe for a chocolate cake?", "Who won the football world cup in 1998?",
                 "How tall is Mount Everest?"]
    best = {q: hits[0].score for q, hits in zip(related + unrelated, retriever.search_many(related + unrelated, 1))}
    print(best)
    assert all(best[q] >= MIN_SCORE for q in related), best
    assert all(best[q] < MIN_SCORE for q in unrelated), best
