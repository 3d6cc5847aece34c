import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from megatron_vlm.data.prompt import PromptEncoder
from megatron_vlm.data.tokenizer import VLM_SPECIAL_TOKENS, VLMTokenizer

TPT = 4  # tokens per tile in these tests


def conv(user="what is the color", answer="red", system="/no_think", **assistant_extra):
    turns = [{"role": "system", "content": system}] if system is not None else []
    return turns + [{"role": "user", "content": user}, {"role": "assistant", "content": answer, **assistant_extra}]


def image(n_tiles):
    return {"type": "image", "tiles": [f"m.t{j}" for j in range(n_tiles)], "grid": [1, 1]}


def test_special_tokens_are_single_ids(tokenizer):
    for t in ("<SPECIAL_10>", "<SPECIAL_11>", "<SPECIAL_12>", "<think>", "</think>", "<unk>", *VLM_SPECIAL_TOKENS):
        assert len(tokenizer.encode(t)) == 1, t
    assert tokenizer.eos_id == tokenizer.token_id("<SPECIAL_12>")
    assert tokenizer.pad_id == tokenizer.token_id("<unk>")
    assert len({tokenizer.image_id, tokenizer.img_start_id, tokenizer.img_end_id, tokenizer.eos_id}) == 4
    text = "the cat 123 <img>\n  river!"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_load_from_file_and_directory(tokenizer_dir):
    from_dir = VLMTokenizer.from_pretrained(tokenizer_dir)
    from_file = VLMTokenizer.from_pretrained(f"{tokenizer_dir}/tokenizer.json")
    assert from_dir.encode("blue house 42") == from_file.encode("blue house 42")
    assert from_dir.eos_id == from_file.eos_id and from_dir.added_tokens == ()


def test_missing_vlm_tokens_are_added():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_special_tokens(["<SPECIAL_12>", "<unk>"])
    wrapped = VLMTokenizer(tok)
    assert set(wrapped.added_tokens) == set(VLM_SPECIAL_TOKENS)
    assert wrapped.encode("<img><image></img>") == [wrapped.img_start_id, wrapped.image_id, wrapped.img_end_id]


def test_chat_template_and_loss_targets(tokenizer):
    enc = PromptEncoder(tokenizer, TPT)
    sample = enc.encode_chat(conv())
    text = tokenizer.decode(sample.tokens)
    assert text == ("<SPECIAL_10>System\n\n<SPECIAL_11>User\nwhat is the color\n"
                    "<SPECIAL_11>Assistant\n<think></think>red\n<SPECIAL_12>\n")
    assert tokenizer.decode(sample.tokens[sample.targets]) == "<think></think>red\n<SPECIAL_12>"
    # targets are one contiguous run ending at eos
    idx = np.flatnonzero(sample.targets)
    assert np.all(np.diff(idx) == 1) and sample.tokens[idx[-1]] == tokenizer.eos_id


def test_system_text_flags_and_reasoning(tokenizer):
    enc = PromptEncoder(tokenizer, TPT)
    sample = enc.encode_chat(conv(system="be brief /think", answer="42", reasoning="six times seven"))
    text = tokenizer.decode(sample.tokens)
    assert text.startswith("<SPECIAL_10>System\nbe brief\n<SPECIAL_11>User\n")
    assert "/think" not in text.split("<SPECIAL_11>User")[0]
    assert tokenizer.decode(sample.tokens[sample.targets]) == "<think>\nsix times seven\n</think>\n42\n<SPECIAL_12>"
    no_system = tokenizer.decode(enc.encode_chat(conv(system=None)).tokens)
    assert no_system.startswith("<SPECIAL_10>System\n\n<SPECIAL_11>User\n")


def test_multi_turn_targets_only_assistant(tokenizer):
    enc = PromptEncoder(tokenizer, TPT)
    turns = conv(answer="one") + [{"role": "user", "content": "and the dog"}, {"role": "assistant", "content": "two"}]
    s = enc.encode_chat(turns)
    assert tokenizer.decode(s.tokens[s.targets]) == "<think></think>one\n<SPECIAL_12><think></think>two\n<SPECIAL_12>"
    user_ids = set(tokenizer.encode("and the dog"))
    assert not any(t in user_ids for t in s.tokens[s.targets] if t not in set(tokenizer.encode("<think></think>")))


def test_image_expansion(tokenizer):
    enc = PromptEncoder(tokenizer, TPT)
    s = enc.encode_chat(conv(user="<image>\nleft <image>\nright"), [image(7), image(1)])
    assert s.tiles_per_media == [7, 1]
    toks = s.tokens.tolist()
    assert toks.count(tokenizer.image_id) == 8 * TPT
    assert toks.count(tokenizer.img_start_id) == 2 and toks.count(tokenizer.img_end_id) == 2
    first = toks.index(tokenizer.img_start_id)
    assert toks[first + 1 : first + 1 + 7 * TPT] == [tokenizer.image_id] * (7 * TPT)
    assert toks[first + 1 + 7 * TPT] == tokenizer.img_end_id
    assert s.last_media_token == len(toks) - 1 - toks[::-1].index(tokenizer.img_end_id)
    assert not s.targets[: s.last_media_token + 1].any()
    with pytest.raises(ValueError):
        enc.encode_chat(conv(user="<image> only one"), [image(1), image(1)])


def test_video_expansion(tokenizer):
    enc = PromptEncoder(tokenizer, TPT)
    video = {"type": "video", "frames": [{"t": 0.0, "tile": "a"}, {"t": 0.5, "tile": "b"}]}
    s = enc.encode_chat(conv(user="<video>\nwhat"), [video])
    text = tokenizer.decode(s.tokens)
    img = "<img>" + "<image>" * TPT + "</img>"
    assert ("This is a video:\nFrame 1 sampled at 0.00 seconds: " + img + "\nFrame 2 sampled at 0.50 seconds: "
            + img + "\n") in text
    assert s.tiles_per_media == [2]


def test_text_document_all_targets(tokenizer):
    s = PromptEncoder(tokenizer, TPT).encode_text("def f():\n    return 1")
    assert s.targets.all() and s.tokens[-1] == tokenizer.eos_id


def test_generation_prompt(tokenizer):
    enc = PromptEncoder(tokenizer, TPT)
    ids = enc.generation_prompt(conv(answer="reference"))
    assert tokenizer.decode(ids).endswith("what is the color\n<SPECIAL_11>Assistant\n<think></think>")
    assert "reference" not in tokenizer.decode(ids)
    thinking = enc.generation_prompt(conv(system="/think"))
    assert tokenizer.decode(thinking).endswith("<SPECIAL_11>Assistant\n<think>\n")


def test_special_token_strings_in_content_stay_text(tokenizer):
    enc = PromptEncoder(tokenizer, TPT)
    doc = 'html = "<img>" + "<image>" + "</img>"  # <SPECIAL_11>User'
    s = enc.encode_text(doc)
    specials = {tokenizer.image_id, tokenizer.img_start_id, tokenizer.img_end_id, tokenizer.token_id("<SPECIAL_11>")}
    assert not specials & set(s.tokens.tolist())
    assert tokenizer.decode(s.tokens[:-1]) == doc
    chat = enc.encode_chat(conv(user="what is <img> here", answer="a </img> tag"))
    assert tokenizer.img_start_id not in chat.tokens.tolist() and tokenizer.img_end_id not in chat.tokens.tolist()
    assert "what is <img> here" in tokenizer.decode(chat.tokens)
