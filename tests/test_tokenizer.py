from transformers import AutoTokenizer

from disagg.engine.tokenizer import Tokenizer


def test_chat_template_and_encoding_match_transformers(smollm_dir):
    ours = Tokenizer.from_dir(smollm_dir)
    theirs = AutoTokenizer.from_pretrained(str(smollm_dir))
    for messages in ([{"role": "user", "content": "Hello there"}],
                     [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]):
        expected = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert ours.apply_chat_template(messages) == expected
        assert ours.encode_chat(messages) == theirs(expected, add_special_tokens=False)["input_ids"]
    assert ours.eos_token == theirs.eos_token and ours.eos_token_id == theirs.eos_token_id


def test_incremental_decode_equals_full_decode(smollm_dir):
    tok = Tokenizer.from_dir(smollm_dir)
    text = "Grüße, 世界! Emoji 🙂 and code: def f(x): return x**2"
    ids = tok.encode(text, add_special_tokens=False)
    out, prefix, read = "", 0, 0
    for i in range(1, len(ids) + 1):
        new, prefix, read = tok.decode_incremental(ids[:i], prefix, read)
        out += new
    assert out == tok.decode(ids) == text


def test_a_prefill_is_continued_as_transformers_cuts_it_and_short_ones_land_right(smollm_dir):
    ours = Tokenizer.from_dir(smollm_dir)
    theirs = AutoTokenizer.from_pretrained(str(smollm_dir))
    turns = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "The answer is"}]
    expected = theirs.apply_chat_template(turns, continue_final_message=True, tokenize=False)
    assert ours.apply_chat_template(turns, continue_final_message=True) == expected
    question = ours.apply_chat_template(turns[:1])  # the user's turn and the assistant's start
    for short in ("<", "|>", "assistant"):  # text the template's own markup also holds
        prefill = [turns[0], {"role": "assistant", "content": short}]
        assert ours.apply_chat_template(prefill, continue_final_message=True) == question + short
    assert ours.encode_chat(turns[:1], add_generation_prompt=False) == ours.encode(
        theirs.apply_chat_template(turns[:1], add_generation_prompt=False, tokenize=False), add_special_tokens=False
    )
