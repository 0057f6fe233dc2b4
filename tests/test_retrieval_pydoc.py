"""The bundled corpus: the CPython language reference (`pydoc_data.topics`). The question set
is checked against the topics' text; with the real MiniLM, hit@5 >= 0.95 and hit@1 >= 0.85
over an index built by `press index build --docs pydoc:topics`; `press ask` answers a
Python question from it with numbered sources."""

import json
import subprocess
import sys

import pytest
from pydoc_data.topics import topics

from compress.data.corpus import PYDOC_QUESTIONS
from retrieval.quality import hit_rates, read_questions
from retrieval.retriever import Retriever
from serve.cli import main

QUESTIONS = PYDOC_QUESTIONS


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_question_set_is_answerable_from_its_topics():
    questions = read_questions(QUESTIONS)
    assert len(questions) >= 40
    assert len({q["question"] for q in questions}) == len(questions)
    for q in questions:
        for topic in q["topics"]:
            assert topic in topics, (q["question"], topic)
            # The passage that answers it is in every topic listed as expected.
            evidence = q["evidence"][topic] if isinstance(q["evidence"], dict) else q["evidence"]
            assert _flat(evidence) in _flat(topics[topic]), (q["question"], topic, evidence)
    assert len({t for q in questions for t in q["topics"]}) >= 40  # spread over the reference


@pytest.fixture(scope="module")
def pydoc_index(tmp_path_factory):
    """Built by `press index build` in a process of its own, as a user builds it (once, one full
    run ranked this index's `nonlocal` topic out of the top 5 when it was built in the test
    worker beside other test files; not reproduced since)."""
    directory = str(tmp_path_factory.mktemp("pydoc") / "index")
    command = [sys.executable, "-m", "serve.cli", "index", "build", "--docs", "pydoc:topics", "--index", directory,
               "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return directory


@pytest.mark.slow
def test_hit_rates_on_the_language_reference(pydoc_index):
    retriever = Retriever.load(pydoc_index)
    assert len(retriever.documents()) == 79
    rates = hit_rates(retriever, read_questions(QUESTIONS), (1, 5))
    print({k: v for k, v in rates.items() if k != "misses"}, rates["misses"])  # shown with -s
    assert rates["hit@5"] >= 0.95, rates["misses"][5]
    assert rates["hit@1"] >= 0.85, rates["misses"][1]
    # Exact search ranks the same way on this small corpus.
    exact = hit_rates(retriever, read_questions(QUESTIONS), (1, 5), exact=True)
    assert abs(exact["hit@5"] - rates["hit@5"]) <= 0.02 and abs(exact["hit@1"] - rates["hit@1"]) <= 0.02


@pytest.mark.slow
def test_press_ask_answers_a_python_question_with_citations(pydoc_index, capsys):
    capsys.readouterr()
    code = main(["ask", "--index", pydoc_index, "--model", "smollm2-135m-instruct", "--json", "-k", "3",
                 "--max-new-tokens", "64", "What does the nonlocal statement do?"])
    assert code == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["found"] and answer["answer"].strip()
    assert [s["number"] for s in answer["sources"]] == [1, 2, 3]
    assert answer["sources"][0]["doc_id"] == "nonlocal"
    assert answer["sources"][0]["location"].startswith('pydoc:topics/nonlocal > The "nonlocal" statement, chars ')
    assert set(answer["cited"]) <= {1, 2, 3}
    assert all(s["cited"] == (s["number"] in answer["cited"]) for s in answer["sources"])
