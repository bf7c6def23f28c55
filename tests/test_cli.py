"""The command layer: every user error of every command ends with exit status 2
and one line naming the flag or file and what was expected, never a
traceback; a failed job exits 1, Ctrl-C 130; `--json` means the same in every
command; `jax-resnet verify` loads no flax, orbax or optax; library calls
leave the process's JAX settings alone.

A new command, or a new way to misuse one, is one more row of `USER_ERRORS`.
The rows run in-process through `cli.main`; two run through a real
`python -m jax_resnet` to see the exit status and stderr a user sees.
"""

import json
import os
import re
import subprocess
import sys

import jax
import pytest

from jax_resnet import cli, train, verify

# (argv, exit status, a fragment of the one-line message). In argv, {file} is a
# regular file, {dir} an existing folder and {missing} a path that does not exist.
SYNTHETIC = ["--model", "tiny", "--dataset", "synthetic", "--out", "{dir}/run", "--no-progress"]
USER_ERRORS = [
    ([], 2, "the following arguments are required: COMMAND"),
    (["nope"], 2, "argument COMMAND: invalid choice: 'nope'"),
    # train: flags
    (["train", "--model", "resnet21"], 2, "argument --model: invalid choice: 'resnet21'"),
    (["train", "--dataset", "imagenet"], 2, "argument --dataset: invalid choice: 'imagenet'"),
    (["train", "--optimizer", "lbfgs"], 2, "argument --optimizer: invalid choice: 'lbfgs'"),
    (["train", "--epochs", "-1"], 2, "argument --epochs: expected a positive integer, got -1"),
    (["train", "--epochs", "ten"], 2, "argument --epochs: expected a positive integer, got 'ten'"),
    (["train", "--batch-size", "0"], 2, "argument --batch-size: expected a positive integer, got 0"),
    (["train", "--lr", "0"], 2, "argument --lr: expected a positive finite number, got 0"),
    (["train", "--lr", "-0.1"], 2, "argument --lr: expected a positive finite number, got -0.1"),
    (["train", "--lr", "nan"], 2, "argument --lr: expected a positive finite number, got nan"),
    (["train", "--weight-decay", "-0.5"], 2, "argument --weight-decay: expected a finite number ≥ 0"),
    (["train", "--seed", "-1"], 2, "argument --seed: expected an integer ≥ 0, got -1"),
    (["train", "--devices", "0"], 2, "argument --devices: expected a positive integer, got 0"),
    # train: output paths
    (["train", "--out", "{file}/run"], 2, "argument --out: cannot create the folder {file}/run: {file} is a file"),
    (["train", "--out", "{file}"], 2, "argument --out: {file} is a file; expected a folder"),
    (["train", "--json", "{dir}"], 2, "argument --json: {dir} is a folder; expected a file name"),
    (
        ["train", "--json", "{missing}/m.json"],
        2,
        "argument --json: cannot write {missing}/m.json: the folder {missing} does not exist",
    ),
    # train: settings only the run can check (data, devices)
    (
        ["train", "--dataset", "mnist", "--data-dir", "{missing}", "--out", "{dir}/run"],
        2,
        "mnist: missing file(s) in {missing}",
    ),
    ([*["train", *SYNTHETIC], "--devices", "99"], 2, "devices: asked for 99 but only"),
    ([*["train", *SYNTHETIC], "--batch-size", "1000"], 2, "batch_size 1000 exceeds the 512 training examples"),
    # train: several processes
    (["train", "--num-processes", "2", "--out", "{dir}/run"], 2, "--coordinator, --process-id: a multi-process run"),
    (
        ["train", "--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"],
        2,
        "--process-id must be in 0..1 for --num-processes 2, got 2",
    ),
    # verify
    (["verify", "--rule", "nope"], 2, "argument --rule: invalid choice: 'nope'"),
    (["verify", "--dtype", "float16"], 2, "argument --dtype: invalid choice: 'float16'"),
    (
        ["verify", "--json", "{file}/rows.json"],
        2,
        "argument --json: cannot write {file}/rows.json: the folder {file} is a file",
    ),
    # info
    (["info", "resnet21"], 2, "argument MODEL: invalid choice: 'resnet21'"),
    (
        ["info", "resnet20", "--input-size", "32", "32"],
        2,
        "--input-size 32 32 does not fit resnet20: ResNetSpec.for_data: argument `image_shape` must be (H, W, C)",
    ),
    (["info", "resnet20", "--input-size", "4", "4", "3", "3"], 2, "--input-size 4 4 3 3 does not fit resnet20"),
    (
        ["info", "resnet20", "--input-size", "0", "32", "3"],
        2,
        "argument --input-size: expected a positive integer, got 0",
    ),
    (["info", "resnet20", "--num-classes", "0"], 2, "argument --num-classes: expected a positive integer, got 0"),
    # flow
    (["flow", "--depths", "9"], 2, "argument --depths: cifar_resnet: `depth` must be 6n+2 with n ≥ 1"),
    (["flow", "--steps", "0"], 2, "argument --steps: expected a positive integer, got 0"),
    (["flow", "--mlp-depths", "-2"], 2, "argument --mlp-depths: expected a positive integer, got -2"),
    (["flow", "--optimizer", "lbfgs"], 2, "argument --optimizer: invalid choice: 'lbfgs'"),
    (["flow", "--out", "{file}/flow"], 2, "argument --out: cannot create the folder {file}/flow: {file} is a file"),
    # bench
    (["bench", "--workload", "nope"], 2, "argument --workload: invalid choice: 'nope'"),
    (["bench", "--rounds", "0"], 2, "argument --rounds: expected a positive integer, got 0"),
    (["bench", "--rounds", "many"], 2, "argument --rounds: expected a positive integer, got 'many'"),
    (["bench", "--markdown", "{missing}/bench.md"], 2, "argument --markdown: cannot write {missing}/bench.md"),
    (["bench", "--round-seconds", "0"], 2, "argument --round-seconds: expected a positive finite number, got 0"),
    # laplace
    (["laplace", "{missing}"], 2, "argument RUN_DIR: {missing} is not a folder; expected a `jax-resnet train` run's"),
    (["laplace", "{dir}"], 2, "argument RUN_DIR: {dir} has no checkpoints/ folder"),
    (["laplace", "--structure", "full", "{dir}"], 2, "argument --structure: invalid choice: 'full'"),
    (["laplace", "--rotations", "0,ten", "{dir}"], 2, "argument --rotations: expected comma-separated angles"),
    (["laplace", "--samples", "0", "{dir}"], 2, "argument --samples: expected a positive integer, got 0"),
    (["laplace", "--prior-precision", "-1", "{dir}"], 2, "argument --prior-precision: expected a positive finite"),
]


@pytest.fixture
def paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing a case might write lands in the repository
    (tmp_path / "a_file").write_text("not a folder\n")
    return {"file": str(tmp_path / "a_file"), "dir": str(tmp_path), "missing": str(tmp_path / "missing")}


def _env():
    # The package under test, also when the child runs in another folder.
    return dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(cli.__file__))))


def _command(argv):
    return argv[0] if argv and argv[0] in cli.COMMANDS else None


def _assert_one_line(err: str, argv, fragment: str):
    lines = err.strip().splitlines()
    prog = "jax-resnet" + (f" {_command(argv)}" if _command(argv) else "")
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), err
    assert fragment in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv, status, fragment", USER_ERRORS, ids=[" ".join(argv) or "(no arguments)" for argv, _, _ in USER_ERRORS]
)
def test_user_errors_exit_2_with_one_line(argv, status, fragment, paths, capsys):
    argv = [a.format(**paths) for a in argv]
    assert cli.main(argv) == status
    captured = capsys.readouterr()
    _assert_one_line(captured.err, argv, fragment.format(**paths))
    assert captured.out == ""


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["info", "resnet21"], "argument MODEL: invalid choice: 'resnet21'"),
        (["train", "--out", "{file}/run"], "argument --out: cannot create the folder {file}/run: {file} is a file"),
    ],
    ids=["info resnet21", "train --out below a file"],
)
def test_a_real_process_exits_2_without_a_traceback(argv, fragment, paths):
    argv = [a.format(**paths) for a in argv]
    result = subprocess.run(
        [sys.executable, "-m", "jax_resnet", *argv], capture_output=True, text=True, timeout=300, env=_env()
    )
    assert result.returncode == 2, result.stderr
    _assert_one_line(result.stderr, argv, fragment.format(**paths))


def _raise(error):
    def fail(*args, **kwargs):
        raise error

    return fail


def test_failed_training_exits_1_and_ctrl_c_exits_130(monkeypatch, paths, capsys):
    monkeypatch.setattr(train, "train", _raise(train.TrainingError("loss became nan at step 3")))
    assert cli.main(["train"]) == 1
    assert capsys.readouterr().err == "jax-resnet train: error: loss became nan at step 3\n"

    full = "--out runs/x: writing runs/x/metrics.jsonl failed (No space left on device); the run stopped; ..."
    monkeypatch.setattr(train, "train", _raise(train.OutputError(full)))
    assert cli.main(["train"]) == 1
    assert capsys.readouterr().err == f"jax-resnet train: error: {full}\n"

    monkeypatch.setattr(train, "train", _raise(KeyboardInterrupt()))
    assert cli.main(["train"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("jax-resnet train: interrupted; every finished epoch is checkpointed") and "--resume" in err

    monkeypatch.setattr(verify, "verify", _raise(KeyboardInterrupt()))
    assert cli.main(["verify"]) == 130
    assert capsys.readouterr().err == "jax-resnet verify: interrupted\n"


def test_a_bug_keeps_its_traceback(monkeypatch):
    monkeypatch.setattr(verify, "verify", _raise(ZeroDivisionError("a bug")))
    with pytest.raises(ZeroDivisionError, match="a bug"):
        cli.main(["verify"])


def test_help_exits_0(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in cli.COMMANDS)


def test_train_flags_are_train_config_fields_with_its_defaults(capsys):
    from jax_resnet.commands import train as train_command

    args = cli.build_parser("train").parse_args(["train"])
    assert train_command.config(args) == train.TrainConfig()
    assert cli.main(["train", "--help"]) == 0
    usage = capsys.readouterr().out
    documented = set(re.findall(r"--[a-z][a-z-]+", train.TrainConfig.__doc__))
    assert documented and all(flag in usage for flag in documented), documented


@pytest.fixture(scope="module")
def relu_rows():
    """`verify` of one rule, run with x64 off (conftest turns it on for the tests)."""
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    try:
        rows = verify.verify("float32", ["relu"])
        x64_after = jax.config.jax_enable_x64
    finally:
        jax.config.update("jax_enable_x64", before)
    return rows, x64_after


def test_verify_leaves_the_x64_setting_alone(relu_rows):
    [row], x64_after = relu_rows
    assert x64_after is False
    assert row["ok"] and row["fd_rel_err"] is not None, "the finite-difference test ran, in float64"


@pytest.mark.parametrize("argv", [["verify"], ["info", "tiny"]], ids=["verify", "info"])
def test_json_flag_alone_prints_json_on_stdout_and_the_table_on_stderr(argv, relu_rows, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(verify, "verify", lambda dtype, names: relu_rows[0])  # its table and JSON, without the cost
    assert cli.main([*argv, "--json"]) == 0
    bare = capsys.readouterr()
    assert bare.err.strip(), "the table goes to stderr"
    path = tmp_path / "out.json"
    assert cli.main([*argv, "--json", str(path)]) == 0
    to_file = capsys.readouterr()
    assert to_file.out.strip() and to_file.err == "", "the table goes to stdout"
    assert json.loads(bare.out) == json.loads(path.read_text())


VERIFY_IMPORTS = """
import sys
from jax_resnet import cli
status = cli.main(["verify", "--rule", "relu"])
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"flax", "orbax", "optax", "matplotlib"})
print("heavy:", heavy)
sys.exit(status)
"""


def test_verify_imports_no_flax_orbax_optax():
    result = subprocess.run(
        [sys.executable, "-c", VERIFY_IMPORTS], capture_output=True, text=True, timeout=300, env=_env()
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "heavy: []" in result.stdout, result.stdout
