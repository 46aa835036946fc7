"""One command-line family: same names, one list format, defaults and help everywhere, old spellings deprecated."""

from __future__ import annotations

import argparse

import pytest

from fedinspect.cli import build_parser, main
from fedinspect.options import obfuscation, obfuscation_list, split_list


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {name: action for action in parser._actions for name in action.option_strings}


def test_every_option_of_every_command_has_help_and_every_command_a_description() -> None:
    for name, command in _commands().items():
        assert command.description, name
        for action in command._actions:
            assert action.help, f"{name} {action.option_strings} has no help"


@pytest.mark.parametrize("command", ["federate", "demo", "fit", "classify"])
def test_help_shows_defaults(command: str, capsys) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "seed of every random choice (default: 0)" in text or "(default: 0)" in text
    expected = {"federate": ["number of clients (factories) (default: 5)", "(default: 10000)", "(default: 256)"],
                "demo": ["(default: runs/demo)", "(default: small)"], "fit": ["(default: 256)"],
                "classify": ["FedAvg training rounds (default: 5, 10 under DP", "(default: 1e-05)"]}[command]
    for part in expected:
        assert part in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_top_level_help_is_plain_text_and_names_papers_not_seeds(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text and "seed 000" not in text and "PIDS paper" in text
    for name in _commands():
        assert name in text


def test_quiet_is_accepted_before_and_after_the_command() -> None:
    parser = build_parser()
    assert parser.parse_args(["synth", "--out", "x"]).quiet is False
    assert parser.parse_args(["-q", "synth", "--out", "x"]).quiet is True
    assert parser.parse_args(["synth", "--out", "x", "-q"]).quiet is True


def test_the_same_idea_has_the_same_name_in_every_command() -> None:
    commands = _commands()
    for name in ("federate", "demo", "classify"):
        options = _options(commands[name])
        for option in ("--dp-delta", "--dp-clip", "--dp-noise", "--obfuscate", "--seed", "--image-size"):
            assert option in options, f"{name} lacks {option}"
    assert "--engine" in _options(commands["demo"]) and "--engine" in _options(commands["federate"])


def test_privacy_study_accepts_only_the_options_it_uses(tmp_path) -> None:
    parser = build_parser()
    for option, value in (("--dp-epsilon", "1"), ("--dp-noise", "1"), ("--obfuscate", "average"),
                          ("--no-centralized", None)):
        argv = ["privacy-study", "--data", str(tmp_path), "--out", str(tmp_path / "o"), option]
        with pytest.raises(SystemExit) as stop:
            parser.parse_args([*argv, value] if value else argv)
        assert stop.value.code == 2
    args = parser.parse_args(["privacy-study", "--data", "d", "--out", "o", "--dp-unit", "embedding",
                              "--dp-delta", "1e-6", "--attack-data", "a"])
    assert (args.dp_unit, args.dp_delta, args.attack_data) == ("embedding", 1e-6, "a")


def test_lists_are_comma_separated_and_old_spellings_still_work_with_a_warning(capsys) -> None:
    assert split_list("1, 5,none", "--epsilons") == ("1", "5", "none")
    assert split_list("0.01,0.05", "--noise", float) == (0.01, 0.05)
    assert capsys.readouterr().err == ""
    assert split_list(["0.01", "0.05"], "--noise", float) == (0.01, 0.05)  # old: space-separated
    assert "--noise 0.01,0.05" in capsys.readouterr().err

    assert obfuscation("average+shuffle") == "average,shuffle" and obfuscation("none") == ""
    assert obfuscation_list("none,average+shuffle") == ("", "average,shuffle")
    assert capsys.readouterr().err == ""
    assert obfuscation("average,shuffle") == "average,shuffle"  # old: comma-joined methods
    assert "--obfuscate average+shuffle" in capsys.readouterr().err
    assert obfuscation_list("none;average+shuffle") == ("", "average,shuffle")  # old: ';' between combinations
    assert "--obfuscations none,average+shuffle" in capsys.readouterr().err
    assert obfuscation_list(["none", "average,shuffle"]) == ("", "average,shuffle")  # old: space-separated
    assert "deprecated" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--noise"):
        split_list("0.1,lots", "--noise", float)


def test_renamed_classify_options_keep_working_with_a_deprecation(capsys) -> None:
    parser = build_parser()
    new = parser.parse_args(["classify", "--data", "d", "--out", "o", "--dp-clip", "2", "--dp-delta", "1e-6"])
    assert capsys.readouterr().err == ""
    old = parser.parse_args(["classify", "--data", "d", "--out", "o", "--max-grad-norm", "2", "--delta", "1e-6"])
    err = capsys.readouterr().err
    assert (new.dp_clip, new.dp_delta) == (old.dp_clip, old.dp_delta) == (2.0, 1e-6)
    assert "--max-grad-norm is now --dp-clip" in err and "--delta is now --dp-delta" in err


def test_runtime_choices_are_the_backbones_and_apply_only_where_there_is_a_backbone(tmp_path, capsys) -> None:
    from fedinspect.backbones import DEFAULT_RUNTIME, RUNTIMES
    from fedinspect.cli import RUNTIMES as CLI_RUNTIMES
    from fedinspect.federation.client import RoundSettings

    assert CLI_RUNTIMES == RUNTIMES and RoundSettings().runtime == DEFAULT_RUNTIME
    with pytest.raises(ValueError, match="unknown runtime 'tensorrt'"):
        RoundSettings(runtime="tensorrt")
    assert main(["-q", "fit", "--detector", "ae_mse", "--runtime", "onnx", "--data", str(tmp_path),
                 "--out", str(tmp_path / "m")]) == 2
    assert "--runtime does not apply to --detector ae_mse (detectors that take it: patchcore, padim, stfpm, " \
        "reverse_distillation, cflow)" in capsys.readouterr().err
    args = build_parser().parse_args(["federate", "--data", "d", "--out", "o", "--runtime", "torch"])
    from fedinspect.cli import _federation_config

    assert _federation_config(args).settings.runtime == "torch"
    args = build_parser().parse_args(["federate", "--data", "d", "--out", "o", "--search", "hnsw"])
    assert _federation_config(args).settings.search == "hnsw"
    with pytest.raises(ValueError, match="unknown search 'kdtree'"):
        RoundSettings(search="kdtree")
