"""``python -m jaxinfer.generate``: SmolLM2 text on stdout, statistics on stderr, argument checks."""

import pytest
from conftest import needs_smollm2

from jaxinfer import generate


@pytest.mark.parametrize(
    "argv, message",
    [
        (["hi", "--kv-dtype", "e4m4"], "kv_dtype must be one of"),
        (["hi", "--kv-dtype", "int8"], "kv_dtype must be one of"),
        (["hi", "--temperature", "-1"], "temperature"),
        (["hi", "--top-p", "0"], "top_p"),
        (["hi", "--min-p", "2"], "min_p"),
        (["hi", "--top-k", "-3"], "top_k"),
        (["hi", "--max-new-tokens", "0"], "max-new-tokens"),
        (["hi", "--backend", "cuda"], "backend"),
    ],
)
def test_bad_arguments_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        generate.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@needs_smollm2
def test_greedy_generation_streams_smollm2_text(capsys):
    assert generate.main(["The capital of France is", "--max-new-tokens", "6", "--backend", "xla"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(" Paris"), out  # SmolLM2-135M-Instruct's greedy continuation
    assert "at most 6 step program(s)" in err and "decode" in err and "tokens/s" in err
    assert "generated 6 tokens (length)" in err
