"""The optional language-model judge (SPEC §10) against a small OpenAI-compatible HTTP server
that the test starts: request format, the 1-of-5 protocol, accuracy and errors."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from crossint.analysis.judge import (
    JudgeEndpoint,
    choice_prompt,
    context_text,
    judge_clusters,
    parse_choice,
)
from crossint.errors import CrossintError

CLUSTERS = [[0, 1, 2, 3], [10, 11, 12], [20, 21, 22], [30, 31, 32, 33]]


def profile(h: int) -> dict:
    return {"id": h, "contexts": [{"tokens": ["Once", " upon", f" t{h}"], "mark": 2,
                                   "activation": 1.0}]}


class Judge(BaseHTTPRequestHandler):
    """Describes feature h as 'topic <cluster of h>'; picks the candidate whose topic matches
    the group's (an oracle), or always answers '1' when the server's mode is 'first'."""

    mode = "oracle"
    requests: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                    "body": body})
        if self.mode == "broken":
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b"overloaded")
            return
        prompt = body["messages"][0]["content"]
        feature = re.search(r"\[\[ t(\d+)\]\]", prompt)
        if feature:
            answer = f"topic {int(feature.group(1)) // 10}"
        elif self.mode == "first":
            answer = "1"
        else:
            group = re.search(r"- topic (\d+)", prompt).group(1)
            options = re.findall(r"^(\d+)\. topic (\d+)$", prompt, re.M)
            answer = next(n for n, topic in options if topic == group) + "."
        reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(reply.encode())

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    Judge.requests = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def endpoint(server) -> JudgeEndpoint:
    return JudgeEndpoint.from_env({"CROSSINT_JUDGE_URL": f"http://127.0.0.1:{server.server_address[1]}/v1/",
                                   "CROSSINT_JUDGE_KEY": "secret",
                                   "CROSSINT_JUDGE_MODEL": "tiny-judge"})


def profiles() -> list[dict]:
    return [profile(h) for c in CLUSTERS for h in c]


def test_an_oracle_judge_scores_one_and_requests_are_openai_shaped(server):
    Judge.mode = "oracle"
    result = judge_clusters({"interaction": CLUSTERS}, profiles(), endpoint(server),
                            progress=False)
    method = result["methods"]["interaction"]
    assert method["n_trials"] == 4 and method["accuracy"] == 1.0
    assert result["chance"] == pytest.approx(0.2) and result["model"] == "tiny-judge"
    for trial in method["trials"]:
        assert len(trial["candidates"]) == 5 and trial["held_out"] in trial["candidates"]
        others = [h for h in trial["candidates"] if h != trial["held_out"]]
        assert not set(others) & set(trial["cluster"])
    request = Judge.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer secret"
    assert request["body"]["model"] == "tiny-judge" and request["body"]["temperature"] == 0
    # each feature is described once, however many trials show it
    described = [r for r in Judge.requests if "[[" in r["body"]["messages"][0]["content"]]
    assert len(described) == len(result["descriptions"])


def test_a_judge_that_always_answers_one_scores_where_the_answer_was_first(server):
    Judge.mode = "first"
    result = judge_clusters({"a": CLUSTERS, "b": CLUSTERS}, profiles(), endpoint(server),
                            seed=3, progress=False)
    for method in result["methods"].values():
        expected = sum(t["candidates"][0] == t["held_out"] for t in method["trials"])
        assert method["accuracy"] == expected / method["n_trials"]
        assert all(t["picked"] == t["candidates"][0] for t in method["trials"])


def test_endpoint_errors_are_clear(server):
    Judge.mode = "broken"
    with pytest.raises(CrossintError, match="HTTP 500"):
        endpoint(server).complete("hello")
    with pytest.raises(CrossintError, match="cannot reach"):
        JudgeEndpoint(url="http://127.0.0.1:9", timeout_s=2).complete("hello")
    with pytest.raises(CrossintError, match="CROSSINT_JUDGE_URL"):
        JudgeEndpoint.from_env({})


def test_prompt_pieces():
    assert context_text({"tokens": ["a", "\nb", " c"], "mark": 1}) == "a[[ b]] c"
    assert parse_choice("Answer: 3", 5) == 2 and parse_choice("7 or 2", 5) == 1
    assert parse_choice("none", 5) is None
    prompt = choice_prompt(["x", "y"], ["p", "q"])
    assert "1. p" in prompt and "2. q" in prompt and "- x" in prompt


def test_cluster_judge_flag_writes_judge_json(server, trained_paper_run, tmp_path, monkeypatch):
    from crossint.cli import main

    Judge.mode = "first"
    monkeypatch.setenv("CROSSINT_JUDGE_URL", f"http://127.0.0.1:{server.server_address[1]}/v1")
    monkeypatch.setenv("CROSSINT_JUDGE_KEY", "secret")
    out = tmp_path / "clusters"
    assert main(["cluster", str(trained_paper_run), "--out", str(out), "--judge",
                 "--judge-clusters", "3", "--min-count", "2", "--random", "10", "--tokens",
                 "600", "--context-length", "32", "--quiet"]) == 0
    verdict = json.loads((out / "judge.json").read_text())
    assert set(verdict["methods"]) == {"interaction", "decoder", "activation"}
    for method in verdict["methods"].values():
        assert method["n_trials"] <= 3
        assert all(t["picked"] == t["candidates"][0] for t in method["trials"])
    assert Judge.requests and all(r["auth"] == "Bearer secret" for r in Judge.requests)
