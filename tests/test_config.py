from pathlib import Path

import pytest
import yaml

from tasks.cli import build_parser, main, overrides
from tasks.config import ConfigError, PipelineConfig, load_config, to_yaml

ROOT = Path(__file__).resolve().parents[1]


def test_params_yaml_is_the_schema_default():
    assert load_config(ROOT / "params.yaml") == PipelineConfig()
    assert yaml.safe_load((ROOT / "params.yaml").read_text()) == yaml.safe_load(to_yaml(PipelineConfig()))


def test_paper_profile_validates():
    cfg = load_config(ROOT / "profiles" / "paper.yaml")
    assert cfg.teacher.train.epochs == 150 and cfg.teacher.train.milestones == [80, 120] and cfg.data.name == "cifar10"
    assert (cfg.kd.lam, cfg.kd.temperature, cfg.student.seeds) == (0.7, 4.0, [0, 1, 2, 3, 4])


def _prefect_config(raw: dict) -> PipelineConfig:
    """As Prefect resolves a deployment's or an API call's parameters before the flow runs."""
    from flows.pipeline import takd_pipeline

    return takd_pipeline.validate_parameters({"config": raw})["config"]


def test_a_partial_config_means_one_thing_from_every_entry_point(tmp_path, monkeypatch):
    """Prefect parameters, the Python API, CLI flags, a partial params.yaml and a --params file all
    complete {"teacher": {"arch": "plain-6"}} the same way: the rest from the schema's defaults."""
    monkeypatch.chdir(tmp_path)
    raw = {"teacher": {"arch": "plain-6"}, "student": {"kd": {"loss": "dkd"}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(raw))
    flags = overrides(build_parser().parse_args(["train-teacher", "--teacher.arch", "plain-6",
                                                 "--student.kd.loss", "dkd"]))
    seen = [_prefect_config(raw), PipelineConfig.model_validate(raw), PipelineConfig(**raw),
            load_config(None, flags), load_config("params.yaml"), load_config("mine.yaml")]
    assert all(cfg == seen[0] for cfg in seen)
    expected = PipelineConfig().model_copy(update={"teacher": PipelineConfig().teacher.model_copy(update={"arch": "plain-6"})})
    assert seen[0].teacher == expected.teacher and seen[0].teacher.train.epochs == PipelineConfig().teacher.train.epochs
    assert seen[0].student.kd == PipelineConfig().kd.model_copy(update={"loss": "dkd"})


def test_a_profile_is_named_once_and_the_given_keys_override_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paper = load_config(ROOT / "profiles" / "paper.yaml")
    named = {"profile": "paper"}
    by_cli = load_config(None, overrides(build_parser().parse_args(["train-teacher", "--profile", "paper"])))
    assert _prefect_config(named).model_dump(exclude={"profile"}) == paper.model_dump(exclude={"profile"})
    assert by_cli == PipelineConfig.model_validate(named) == _prefect_config(named)
    over = PipelineConfig.model_validate({"profile": "paper", "kd": {"lam": 0.2}, "student": {"arch": "plain-4"}})
    assert (over.kd.lam, over.kd.temperature, over.student.arch, over.student.train.epochs) == (0.2, 4.0, "plain-4", 150)
    with pytest.raises(ConfigError, match=r"profile: unknown profile 'papr'; available: imagenet, paper"):
        PipelineConfig.model_validate({"profile": "papr"})
    (tmp_path / "nested.yaml").write_text("profile: paper\n")
    with pytest.raises(ConfigError, match="nested.yaml: a profile cannot name another profile"):
        PipelineConfig.model_validate({"profile": "nested.yaml"})


@pytest.mark.parametrize("text,message", [
    ("student: {arch: plain-2, colour: red}", "student.colour: Extra inputs are not permitted"),
    ("kd: {lam: 1.5}", "kd.lam: Input should be less than or equal to 1"),
    ("teacher: {train: {epochs: many}}", "teacher.train.epochs: Input should be a valid integer"),
    ("assistant: {arch: plain-3}", "assistant.arch: Value error, unknown model 'plain-3'"),
    ("data: {name: mnist}", "data.name: Value error, unknown data set 'mnist'"),
    ("kd: {loss: fitnet}", "kd.loss: Value error, unknown loss 'fitnet'; available: adversarial, at, ce, crd, ctkd, dist, dkd, dml, fitnets, irg, kd"),
    ("- just\n- a list", "must be a mapping"),
])
def test_bad_params_name_the_key(tmp_path, text, message):
    p = tmp_path / "params.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(p)


def test_cli_flags_come_from_the_schema_and_override_the_file(tmp_path):
    args = build_parser().parse_args(["distill-student-takd", "--student.arch", "plain-4", "--kd.lam", "0.25",
                                      "--teacher.train.milestones", "[3, 6]"])
    cfg = load_config(ROOT / "params.yaml", overrides(args))
    assert cfg.student.arch == "plain-4" and cfg.kd.lam == 0.25 and cfg.teacher.train.milestones == [3, 6]
    assert cfg.teacher.arch == "air-32"  # untouched keys keep params.yaml's values


def test_cli_reports_errors_in_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train-teacher", "--kd.temperature", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "kd.temperature: Input should be greater than 0" in err[0]
    assert main(["evaluate"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "evaluate reads the output of prepare-data, which has not been produced yet" in err[0]
    assert not (tmp_path / "data" / "models").exists()


def test_every_stage_is_a_subcommand_with_help(capsys):
    from takd.cli import build_parser as takd_parser
    from tasks.stages import STAGES

    for parser, cmd in [(build_parser(), name) for name in STAGES] + [(takd_parser(), "pipeline")]:
        with pytest.raises(SystemExit) as e:
            parser.parse_args([cmd, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "--student.train.lr" in out and ("--seed" in out) == (cmd != "pipeline" and STAGES[cmd].per_seed)


@pytest.mark.parametrize("key,value", [("data.root", "../../etc"), ("data.source_dir", "a/../../b"),
                                       ("teacher.checkpoint", "../outside.pt"), ("data.name", "imagefolder:../x")])
def test_paths_cannot_climb_out(key, value):
    with pytest.raises(ConfigError, match=f"{key}: Value error, path .* must not contain '..'"):
        load_config(None, {key: value})


def test_a_hop_kd_inherits_the_top_level_kd_however_the_config_arrives():
    """params.yaml, the CLI and the Prefect form (a PipelineConfig validated from JSON) agree."""
    raw = {"kd": {"temperature": 5.0, "lam": 0.5}, "student": {"arch": "plain-2", "kd": {"loss": "dkd"}}}
    for cfg in (PipelineConfig.model_validate(raw), load_config(None, {"kd.temperature": 5.0, "kd.lam": 0.5,
                                                                       "student.kd.loss": "dkd"})):
        assert (cfg.student.kd.loss, cfg.student.kd.temperature, cfg.student.kd.lam) == ("dkd", 5.0, 0.5)
        assert cfg.assistant.kd is None
    again = PipelineConfig.model_validate(PipelineConfig.model_validate(raw).model_dump())
    assert again == PipelineConfig.model_validate(raw)
