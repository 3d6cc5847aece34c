"""Scorers on hand-made cases, and run_task end to end with a scripted model (known outputs)."""

import math

import pytest
import torch

from megatron_vlm.data_prep.train_tokenizer import train_bpe
from megatron_vlm.data.prompt import PromptEncoder
from megatron_vlm.evaluation.tasks import (
    EvalSample,
    chat_answer_text,
    code_line_from_continuation,
    code_line_match,
    contains_answer,
    exact_match,
    generation_budget,
    normalize,
    run_task,
)


def test_normalize_and_exact_match():
    assert normalize("  Hello \n  World\t") == "hello world"
    assert exact_match("Cloud  Lantern ", "cloud lantern")
    assert exact_match("\nSTOP\n", "stop")
    assert not exact_match("cloud lanterns", "cloud lantern")
    assert not exact_match("cloudlantern", "cloud lantern")
    assert not exact_match("", "7")
    assert not exact_match(None, "7")
    assert exact_match("17", "17") and not exact_match("17", "1")


def test_contains_for_needle():
    assert contains_answer("The secret number is 4821.", "4821")
    assert contains_answer("4821", "4821")
    assert not contains_answer("4812", "4821")
    assert not contains_answer(None, "4821")
    assert not contains_answer("anything", "")  # an empty reference never counts


def test_code_line_match_keeps_indentation():
    assert code_line_match("    return x  ", "    return x")
    assert not code_line_match("return x", "    return x")
    assert not code_line_match("  return x", "    return x")
    assert not code_line_match(None, "    return x")


def test_answer_extraction():
    assert chat_answer_text(" 42\n") == "42"
    assert chat_answer_text("\n40 + 2 = 42\n</think>\n42\n") == "42"
    assert code_line_from_continuation("\n    return x\n    y = 1", "\n") == "    return x"
    assert code_line_from_continuation("\n    return x", "\n") == "    return x"
    assert code_line_from_continuation("\n\n    pass\n", "\n\n") == "    pass"
    assert code_line_from_continuation(" + 1\n    return x", "\n") is None  # continued the line


def test_generation_budget():
    s = EvalSample("ocr", "a", [1], "x", ref_tokens=3)
    assert generation_budget(s, max_new_tokens=32, slack=4) == 7
    assert generation_budget(s, max_new_tokens=5, slack=4) == 5
    long = EvalSample("text", "b", [1], "x", ref_tokens=40)  # e.g. a reasoning trace
    assert generation_budget(long, max_new_tokens=32, slack=4) == 44


# ---- run_task with a scripted model ------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    texts = ["cloud lantern river stone def return self value the secret number is 4821",
             "    return x\n    y = 1\nclass A:\n    pass\n"] * 20
    return train_bpe(texts, vocab_size=300)


class ScriptedLM(torch.nn.Module):
    """Stands in for the VLM: after prompt p it emits script[p] token by token (then eos), so
    every argmax is known. Counts forward passes."""

    pre_process = post_process = True

    def __init__(self, scripts: dict, eos_id: int, vocab: int, documents=()):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.scripts, self.eos_id, self.vocab, self.calls = scripts, eos_id, vocab, 0
        self.documents = [tuple(d) for d in documents]  # teacher-forced: predict their next token

    def _next(self, ids: list):
        """The scripted next token after ``ids`` (a document's next token, else the longest
        matching prompt's continuation), else None."""
        for doc in self.documents:
            if len(ids) < len(doc) and tuple(ids) == doc[: len(ids)]:
                return doc[len(ids)]
        best = None
        for prompt, cont in self.scripts.items():
            if len(prompt) <= len(ids) and tuple(ids[: len(prompt)]) == prompt:
                if best is None or len(prompt) > len(best[0]):
                    best = (prompt, cont)
        if best is None:
            return None
        k = len(ids) - len(best[0])
        return best[1][k] if k < len(best[1]) else self.eos_id

    def forward(self, input_ids, tiles=None):
        self.calls += 1
        ids = input_ids[0].tolist()
        logits = torch.zeros(1, len(ids), self.vocab)
        logits[0, :, self.vocab - 1] = 9.0  # a padded-vocabulary entry: must never be chosen
        for i in range(len(ids)):
            nxt = self._next(ids[: i + 1])
            if nxt is not None:
                logits[0, i, nxt] = 5.0
        assert self._next(ids) is not None or tuple(ids) in self.documents, f"unexpected {ids}"
        return logits


def _chat(enc, tok, question, answer, generated):
    conv = [{"role": "system", "content": "/no_think"}, {"role": "user", "content": question},
            {"role": "assistant", "content": answer}]
    prompt = enc.generation_prompt(conv)
    return EvalSample("ocr", question, prompt, answer, ref_tokens=len(enc.encode_plain(answer)) + 2), \
        tuple(prompt), generated


def test_run_task_scores_scripted_outputs(tokenizer):
    enc = PromptEncoder(tokenizer, tokens_per_tile=4)
    tok = tokenizer
    eos = tok.eos_id
    cases = [
        _chat(enc, tok, "q one", "cloud lantern", tok.encode("Cloud  lantern\n")),       # right
        _chat(enc, tok, "q two", "river", tok.encode("river stone\n")),                   # wrong
        _chat(enc, tok, "q three", "stone", tok.encode("stone") + tok.encode(" stone") * 30),  # never stops
    ]
    samples = [c[0] for c in cases]
    scripts = {c[1]: c[2] for c in cases}
    vocab = tok.vocab_size + 8  # the model's vocabulary is padded
    model = ScriptedLM(scripts, eos, vocab)
    result = run_task(model, tok, samples, max_new_tokens=32, slack=4)
    assert result.scores == {"ocr_acc": pytest.approx(1 / 3)}
    preds = result.predictions
    assert [p["correct"] for p in preds] == [True, False, False]
    assert preds[0]["prediction"] == "Cloud  lantern" and preds[0]["stop"] == "stop_id"
    assert preds[1]["prediction"] == "river stone"
    assert preds[2]["stop"] == "length"
    assert preds[2]["new_tokens"] == generation_budget(samples[2], 32, 4)
    # eos ends generation: one forward per generated token plus the one that gave eos
    n0 = len(tok.encode("Cloud  lantern\n"))
    n1 = len(tok.encode("river stone\n"))
    assert model.calls == (n0 + 1) + (n1 + 1) + preds[2]["new_tokens"]


def test_needle_counts_a_contained_answer(tokenizer):
    enc = PromptEncoder(tokenizer, tokens_per_tile=4)
    s, prompt, _ = _chat(enc, tokenizer, "what is the secret number", "4821", [])
    s.task = "needle"
    s.ref_tokens = 20
    gen = tokenizer.encode("the secret number is 4821\n")
    result = run_task(ScriptedLM({prompt: gen}, tokenizer.eos_id, tokenizer.vocab_size + 8),
                      tokenizer, [s])
    assert result.scores == {"needle_acc": 1.0}


def test_code_line_and_perplexity(tokenizer):
    enc = PromptEncoder(tokenizer, tokens_per_tile=4)
    tok = tokenizer
    vocab = tok.vocab_size + 8

    def sample(name, answer):
        prefix = f"class {name}:\n    def f(self, x):\n"
        document = enc.encode_text(prefix + "        return x\n").tokens.tolist()
        prompt_text = prefix.rstrip()
        return EvalSample("code", name, enc.encode_plain(prompt_text), answer, ref_tokens=12,
                          tail="\n", prompt_text=prompt_text, document=document)

    right, wrong = sample("A", "        return x"), sample("B", "        return y")
    assert right.document[: len(right.prompt_ids)] == right.prompt_ids
    # the continuation goes on past the line: generation must stop once the line is complete
    cont = tok.encode("\n        return x\n        y = 1\n        z = 2\n")
    scripts = {tuple(right.prompt_ids): cont, tuple(wrong.prompt_ids): cont}
    model = ScriptedLM(scripts, tok.eos_id, vocab)
    result = run_task(model, tok, [right, wrong], max_new_tokens=32, slack=4)
    assert result.scores["code_line_acc"] == 0.5
    assert [p["prediction"] for p in result.predictions] == ["        return x"] * 2
    assert all(p["stop"] == "stop_fn" for p in result.predictions)
    gen_text = tok.decode(cont[: result.predictions[0]["new_tokens"]])
    assert gen_text.startswith("\n        return x\n") and "z" not in gen_text

    # Perplexity: a model scripted to predict each document token with logit 5 (0 elsewhere;
    # the padded-vocabulary entry excluded) has NLL log(e^5 + V - 1) - 5 per token.
    # (Generation then follows the documents: "\n        return x\n" and eos.)
    model = ScriptedLM({}, tok.eos_id, vocab, documents=[right.document])
    result = run_task(model, tok, [right], max_new_tokens=32, slack=4)
    nll = math.log(math.exp(5.0) + tok.vocab_size - 1) - 5.0
    assert result.scores["code_ppl"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert result.scores["code_line_acc"] == 1.0
