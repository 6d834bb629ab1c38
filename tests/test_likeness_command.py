"""The ``likeness`` console command: installed, short help, typos answered, LightningCLI's optimizer options refused."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from likeness_command import MAIN_SETTINGS, SUBCOMMANDS, cli, option_names

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        cli(list(argv))
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


def test_console_script_is_installed_and_quiet(demo_cli, tmp_path):
    """`likeness` is what pyproject installs; it runs train.py's CLI without the libraries' import noise."""
    script = Path(sys.executable).parent / "likeness"
    assert script.is_file(), "pip install -e . installs the likeness command"
    done = subprocess.run(
        [str(script), *demo_cli("fit", tmp_path), "--print_config"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pretrained_model_name_or_path" in done.stdout
    for noise in ("torchvision", "Tip:", "Loading weights"):
        assert noise not in done.stderr, done.stderr


def test_the_demo_model_builder_is_quiet_too():
    """README's demo starts with ``python -m stable_diffusion.tiny_sd``: no torchvision notice (installing
    torchvision, as the notice suggests, breaks the pinned torch)."""

    def stderr_of(code: str) -> str:
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stderr

    if "requires torchvision" not in stderr_of("from diffusers import StableDiffusionPipeline"):
        pytest.skip("this transformers prints no torchvision notice on diffusers' import")
    assert "torchvision" not in stderr_of("import stable_diffusion.tiny_sd")


def test_short_help_lists_settings_that_exist(capsys):
    code, out, _ = run_cli(capsys, "fit", "--help")
    assert code == 0 and len(out.splitlines()) < 30 and "--help-all" in out
    # Every setting the short help lists is one the full parser accepts (no stale names).
    parser_options, config = _fit_options()
    for option, _ in MAIN_SETTINGS:
        name = option.split()[0]
        # Class arguments (the optimizer's, the logger's) are options of the class chosen: look in the config.
        assert name in parser_options or name[2:] in config, option
    code, out, _ = run_cli(capsys)
    assert code == 2 and all(name in out for name in SUBCOMMANDS)


def _fit_options():
    """Every option of ``likeness fit`` and the parsed demo config, from the parser LightningCLI builds."""
    import train

    captured = {}

    class Stop(Exception):
        pass

    original = train.LikenessCLI.before_instantiate_classes

    def grab(self):
        captured["options"] = option_names(self.parser)
        captured["config"] = self.config["fit"]
        raise Stop

    train.LikenessCLI.before_instantiate_classes = grab
    try:
        with pytest.raises(Stop):
            train.main(["fit", "--config", DEMO, "--model.pretrained_model_name_or_path=x"])
    finally:
        train.LikenessCLI.before_instantiate_classes = original
    return set(captured["options"]), captured["config"]


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--data.dat_dir", "x"], "did you mean --data.data_dir?"),
        (["--trainer.max_step", "5"], "did you mean --trainer.max_steps?"),
        (["--model.lora_rnk", "4"], "did you mean --model.lora_rank?"),
        (["--optimizer", "torch.optim.SGD"], "the optimizer is model.optimizer"),
        (["--lr_scheduler", "torch.optim.lr_scheduler.StepLR"], "the schedule is model.lr_scheduler"),
    ],
)
def test_typos_and_refused_options_get_one_short_answer(capsys, argv, says):
    code, _, err = run_cli(capsys, "fit", "--config", DEMO, *argv)
    assert code == 2 and says in err
    assert "usage:" not in err and len(err.splitlines()) <= 4, err


def test_top_level_optimizer_in_a_config_file_is_refused(capsys, tmp_path):
    """LightningCLI would let it replace the model's optimizer and schedule without a word (issue #10)."""
    extra = tmp_path / "sgd.yaml"
    extra.write_text("optimizer:\n  class_path: torch.optim.SGD\n  init_args:\n    lr: 0.1\n")
    code, _, err = run_cli(capsys, "fit", "--config", DEMO, "--config", str(extra), "--print_config")
    assert code == 2 and "the optimizer is model.optimizer" in err


def test_export_subcommand_is_the_export_command(capsys, tmp_path):
    code, _, err = run_cli(capsys, "export", str(tmp_path / "missing.ckpt"))
    assert code == 2 and "no such checkpoint file" in err and "likeness" not in err.split("error:")[0]


def test_score_subcommand_has_a_short_help_and_one_line_errors(capsys):
    code, out, _ = run_cli(capsys, "score", "--help")
    assert code == 0 and out.startswith("usage: likeness score") and len(out.splitlines()) < 40
    for option in ("--images", "--lora", "--ckpt", "--base", "--photos", "--prompts", "--clip-model", "--out"):
        assert option in out, option
    code, out, err = run_cli(capsys, "score", "--photos", "x")
    assert code == 2 and not out and err.startswith("error: ") and len(err.splitlines()) == 1
    assert "--images" in err and "--ckpt" in err and "usage:" not in err
    code, _, err = run_cli(capsys, "score", "--images", "x", "--prompt", "p")  # no abbreviations, as fit
    assert code == 2 and "unrecognized option --prompt; did you mean --prompts?" in err
    # A mistyped option is named before any missing one (argparse said "--images is required" for --imgs).
    code, _, err = run_cli(capsys, "score", "--imgs", "x")
    assert code == 2 and err.startswith("error: unrecognized option --imgs; did you mean --images?"), err
    code, _, err = run_cli(capsys, "export", "--hlep")
    assert code == 2 and err.startswith("error: unrecognized option --hlep; did you mean --help?"), err
    assert "usage:" not in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(("code", "hint"), [(errno.EROFS, True), (errno.ENOSPC, True), (errno.ENOENT, False)])
def test_a_disk_failing_under_a_run_says_what_is_kept_and_how_to_go_on(capsys, code, hint):
    # E.g. the TensorBoard writer's flush when the run folder went read-only: its bare OSError names no way out.
    from likeness_command import reported_errors

    with pytest.raises(SystemExit) as info, reported_errors():
        raise OSError(code, os.strerror(code), "/runs/demo/version_0/events.out.tfevents")
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"{os.strerror(code)}: '/runs/demo/version_0/events.out.tfevents'" in err
    assert ("continue with --ckpt_path last" in err) == hint, err


@pytest.mark.parametrize(("word", "guess"), [("scor", "score"), ("fitt", "fit"), ("vaildate", "validate"), ("x", None)])
def test_a_mistyped_command_gets_the_nearest_command_not_an_option(capsys, word, guess):
    """argparse answered `likeness scor` with 'did you mean --validation?' and listed only LightningCLI's four."""
    code, out, err = run_cli(capsys, word)
    assert code == 2 and not out and "--validation" not in err
    assert all(name in err.splitlines()[0] for name in SUBCOMMANDS)
    assert (f"did you mean `likeness {guess}`?" in err) == (guess is not None)


def test_fit_without_a_config_is_pointed_at_one(capsys):
    code, _, err = run_cli(capsys, "fit")
    assert code == 2 and "start from a config: --config configs/brad.yaml" in err, err
