"""The command line as a new user meets it (issue 31, part 6).

- every subcommand has a description, help text for every option (stating its default when it
  has one) and examples; each example is run through bash (so its quoting is what a user pasting
  it gets) and parsed by the real parser;
- prompts: $'...' examples give real line breaks, --prompt-file reads a file, a literal \\n warns;
- --temperature <= 0 is refused by the CLI and by the Python API;
- answers carry no leading space (text), token ids are unchanged, stream pieces join to the text;
- `export` without torch, `--artifacts /no/such/dir`, a broken manifest: one line, exit status 2;
- the exporter's torchvision notices are silenced; `validate` takes --artifacts.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from maven_edge.cli import build_parser, main
from maven_edge.core.cliutil import examples_of

ROOT = Path(__file__).resolve().parents[1]
DEMO_1 = str(ROOT / "model_src" / "samples" / "demo_1.png")


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


COMMANDS = sorted(subcommands())


def test_every_command_is_here():
    assert set(COMMANDS) >= {"import-hf", "train", "eval", "ablations", "export", "validate", "build-trt", "quantize",
                             "calib-set", "generate", "demo", "inspect", "bench", "quantize-report"}


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_has_help_stating_its_default(name):
    parser = subcommands()[name]
    assert parser.description and len(parser.description) > 40, f"{name} has no description"
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flag = "/".join(action.option_strings) or action.dest
        assert action.help and action.help != argparse.SUPPRESS, f"{name} {flag} has no help text"
        default = action.default
        if default not in (None, False, argparse.SUPPRESS) and default != []:
            assert "default" in action.help.lower(), f"{name} {flag} (default {default!r}) does not state its default"


def _bash_argv(command: str) -> list[str]:
    """The argv bash gives a program for this command line (quotes, $'...' and all)."""
    done = subprocess.run(["bash", "-c", f"printf '%s\\0' {command}"], capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.decode().split("\0")[:-1]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("name", COMMANDS)
def test_examples_work_when_pasted_into_bash(name):
    parser = subcommands()[name]
    examples = examples_of(parser)
    assert examples and "examples:" in parser.format_help(), f"{name} has no examples in its help"
    mine = [e for e in examples if e.startswith(f"maven-edge {name}")]
    assert mine, f"none of {name}'s examples runs {name}"
    for example in examples:
        argv = _bash_argv(example)
        while argv and "=" in argv[0] and argv[0].split("=", 1)[0].isidentifier():
            argv = argv[1:]  # VAR=value before the command: the environment, not an argument
        assert argv[0] == "maven-edge", example
        try:
            args = build_parser().parse_args(argv[1:])
        except SystemExit as exc:  # pragma: no cover - the assertion message is the point
            raise AssertionError(f"{name}: example does not parse: {example}") from exc
        assert args.command == argv[1]
        prompt = getattr(args, "prompt", None)
        if prompt:
            assert "\n" in prompt and "\\n" not in prompt, f"the example's prompt has no real line break: {example}"


# ---- generate: prompts, temperature, answers ---------------------------------------------------------


@pytest.fixture(scope="module")
def artifacts(pytestconfig) -> Path:
    from tools.soak import cached_test_artifacts

    return cached_test_artifacts(pytestconfig.cache.mkdir("maven-runtime-artifacts"))


@pytest.fixture(scope="module")
def pipe(artifacts):
    from tools.soak import load_pipeline

    return load_pipeline(artifacts)


PROMPT = "<image>\nQuestion: what color is the circle?\nAnswer:"


def _generate(capsys, *argv: str) -> tuple[int, dict, str]:
    rc = main(["generate", *argv, "--json", "--compact", "--max-new-tokens", "6", "--threads", "1"])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if rc == 0 else {}), err


def test_prompt_file_and_literal_backslash_n(artifacts, tmp_path, capsys, pipe):
    want = pipe.generate([DEMO_1], PROMPT, max_new_tokens=6)
    base = ["--artifacts", str(artifacts), "--image", DEMO_1]
    (tmp_path / "q.txt").write_text(PROMPT + "\n")  # one trailing newline is dropped
    rc, got, err = _generate(capsys, *base, "--prompt-file", str(tmp_path / "q.txt"))
    assert rc == 0 and got["token_ids"] == want.token_ids and "warning" not in err
    rc, got, err = _generate(capsys, *base, "--prompt", PROMPT)  # what $'...' gives
    assert rc == 0 and got["token_ids"] == want.token_ids and "warning" not in err
    rc, got, err = _generate(capsys, *base, "--prompt", PROMPT.replace("\n", "\\n"))  # what "..." gives
    assert rc == 0 and "warning: the prompt holds a literal \\n" in err and "--prompt-file" in err
    rc, _, err = _generate(capsys, *base, "--prompt-file", str(tmp_path / "missing.txt"))
    assert rc == 2 and err.strip() == f"maven-edge generate: error: --prompt-file {tmp_path / 'missing.txt'}: file not found"


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "hot"])
def test_cli_refuses_a_temperature_that_is_not_positive(value, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["generate", "--artifacts", "x", "--prompt", "p", "--temperature", value])
    assert exc.value.code == 2
    assert "--temperature must be" in capsys.readouterr().err


@pytest.mark.parametrize("value", [0, 0.0, -1, float("nan"), -0.5])
def test_api_refuses_a_temperature_that_is_not_positive(pipe, value):
    from maven_edge.core.errors import InputError

    with pytest.raises(InputError, match=r"temperature must be > 0, got .*leave temperature unset or pass greedy=True"):
        pipe.generate([], "Question: hi\nAnswer:", temperature=value)
    assert pipe.generate([], "Question: hi\nAnswer:", temperature=0.7, max_new_tokens=2).token_ids


def test_answers_have_no_leading_space_and_pieces_join_to_the_text():
    """The shipped model answers " blue" (trained on "prompt answer"); the text is "blue"."""
    from maven_edge.model_src.resources import shipped_checkpoint
    from maven_edge.runtime.pipeline import MavenPipeline

    pipe = MavenPipeline.from_checkpoint(shipped_checkpoint())
    res = pipe.generate([DEMO_1], PROMPT, max_new_tokens=8)
    raw = pipe.tokenizer.decode(res.token_ids)
    assert raw != raw.lstrip() and res.text == raw.lstrip()  # the model's answer starts with a space; text does not
    stream = pipe.stream([DEMO_1], PROMPT, max_new_tokens=8)
    pieces = list(stream)
    assert "".join(pieces) == stream.result.text == res.text and stream.result.token_ids == res.token_ids
    assert pieces[0] and not pieces[0][0].isspace()


# ---- one-line errors --------------------------------------------------------------------------------


def test_missing_artifacts_directory_says_it_does_not_exist(capsys):
    rc = main(["generate", "--artifacts", "/no/such/dir", "--prompt", "hi"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.startswith("maven-edge generate: error: artifact directory /no/such/dir does not exist")


NO_TORCH = r"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Block())
from maven_edge.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("argv", [["export", "--preset", "tiny", "--out", "OUT"],
                                  ["train", "--preset", "tiny", "--out", "OUT"],
                                  ["eval", "--checkpoint", "model_src/checkpoints/tiny"]])
def test_torch_commands_without_torch_say_so_in_one_line(tmp_path, argv):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    done = subprocess.run([sys.executable, "-c", NO_TORCH, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith(f"maven-edge {argv[0]}: error: this command needs torch, which is not installed here")


def test_torchvision_notices_of_the_exporter_are_silenced(caplog):
    from maven_edge.export.onnx_export import TORCH_ONNX_REGISTRATION_LOGGER

    log = logging.getLogger(TORCH_ONNX_REGISTRATION_LOGGER)
    with caplog.at_level(logging.WARNING, logger=TORCH_ONNX_REGISTRATION_LOGGER):
        log.warning("torchvision is not installed. Skipping %s", "torchvision::nms")
        log.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]


def test_validate_takes_artifacts_and_keeps_the_positional_with_a_note(capsys):
    from maven_edge.core.errors import InputError
    from maven_edge.export.commands import validate_artifacts_arg

    args = build_parser().parse_args(["validate", "--artifacts", "artifacts/tiny"])
    assert validate_artifacts_arg(args) == Path("artifacts/tiny") and capsys.readouterr().err == ""
    args = build_parser().parse_args(["validate", "artifacts/tiny"])
    assert validate_artifacts_arg(args) == Path("artifacts/tiny")
    assert "positional ARTIFACTS is deprecated; use --artifacts artifacts/tiny" in capsys.readouterr().err
    with pytest.raises(InputError, match="give --artifacts DIR"):
        validate_artifacts_arg(build_parser().parse_args(["validate"]))
    with pytest.raises(InputError, match="not both"):
        validate_artifacts_arg(build_parser().parse_args(["validate", "--artifacts", "a", "b"]))


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_decode_during_prefill_reaches_the_pipeline_options(command):
    from maven_edge.runtime.commands import pipeline_options

    for extra, prefill_first in (([], True), (["--decode-during-prefill"], False)):
        prompt = ["--prompt", "hi"] if command == "generate" else []
        args = build_parser().parse_args([command, "--artifacts", "A", *prompt, *extra])
        caching = pipeline_options(args).caching()
        assert caching.prefill_first is prefill_first and caching.max_batch == 4
