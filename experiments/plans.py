"""Each experiment as a plan: the trainings it needs (TrainSpecs, engine/spec.py), labelled by variant and seed.

A plan is data, not code that runs: the Prefect flow, the DVC matrix stages and the CLI all read the same plan
and run its trainings as the pipeline runs its own (tasks/train.py), each in a process of its own. A training's
folder (data/zoo/<id>) is named by its spec's identity, so trainings that two plans share (the teacher, the TAs,
the NOKD and BLKD students) are trained once.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from fnmatch import fnmatch
from itertools import combinations
from pathlib import Path
from typing import Callable

from engine.config import KDConfig
from engine.errors import KDError
from engine.losses import LOSSES
from engine.spec import GuideUse, Role, TrainSpec
from models import build_model
from tasks import train as training
from tasks.catalog import Catalog
from tasks.config import PipelineConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Row:
    variant: str  # a slug: DVC matrix items and file names use it
    seed: int
    spec: TrainSpec
    label: str = ""  # what tables and plots call it
    x: str = ""  # the architecture a size plot places it at


@dataclass
class Plan:
    name: str
    title: str
    rows: list[Row]
    references: list[Row] = field(default_factory=list)  # teacher / TAs: one seed, shown beside the students
    contrasts: list[tuple[str, str]] = field(default_factory=list)  # (a, b): a - b paired by seed
    plot: str = "bar"  # bar | size-accuracy | size-gain
    x_title: str = ""

    def select(self, variant: str = "*", seed: int | None = None) -> list[Row]:
        """Rows whose variant matches the glob and, when given, the seed."""
        return [r for r in self.rows + self.references
                if fnmatch(r.variant, variant) and (seed is None or r.seed == seed)]

    def label(self, variant: str) -> str:
        return next((r.label or r.variant for r in self.rows + self.references if r.variant == variant), variant)

    def trainings(self, variant: str = "*", seed: int | None = None) -> dict[str, TrainSpec]:
        """Every training the selected rows (references too) need, by id, each once, upstream first."""
        return {s.id: s for r in self.select(variant, seed) for s in r.spec.lineage()}


DEFAULT_TARGETS = "soft_targets"  # a zoo training's cache, made as the configuration's `cache` says


def reading(g: TrainSpec, use: GuideUse, default: GuideUse) -> TrainSpec:
    """Guide `g` as a training that reads it through `use` sees it: where a cache other than the configuration's
    is read, from a folder of its own beside the default one (the guide's identity, and so its training, unchanged)."""
    made = use.cache()
    if use.online or made == default.cache():
        return g
    suffix = f"-k{made.views}" + (f"-top{made.topk}" if made.topk else "") + (f"-seed{made.seed}" if made.seed else "")
    return g.model_copy(update={"targets": g.targets + suffix})


def zoo(cfg: PipelineConfig, role: Role, arch: str, seed: int, guides: list[TrainSpec] = (), *, epochs: int | None = None,
        lr: float | None = None, kd: KDConfig | None = None, survival: float = 1.0,
        use: GuideUse | None = None, stop_after: int | None = None, input: str | None = None) -> TrainSpec:
    """An experiment's training: its role's recipe (epochs, lr overridden), its hop's loss (`kd`, else the config's),
    its guides read as `use` says (else as the config's `cache`), test accuracy measured; in data/zoo/<id>. It
    learns from labels only when it has no guides and its loss needs a teacher; DML and self-distillation need none."""
    hop = kd or cfg.kd
    used = hop if guides or not LOSSES[hop.loss].needs_teacher else None
    if use is not None:
        guides = [reading(g, use, training.use(cfg)) for g in guides]
    input = input or getattr(cfg, role).input
    s = training.spec(cfg, role, arch, seed, train=training.recipe(cfg, role, epochs=epochs, lr=lr), kd=used,
                      guides=tuple(guides), reading=use, survival=survival, test=True, stop_after=stop_after,
                      input=input)
    folder, source = Catalog(Path(".")).zoo(s.id), " + ".join(f"{g.role} {g.arch}" for g in guides) or "labels"
    stopped = (f", stopped after epoch {stop_after}" if stop_after else "") + (f", reading {input}" if input else "")
    return s.model_copy(update={"name": s.id, "out": str(folder / "model"), "targets": str(folder / DEFAULT_TARGETS),
                                "method": training.method(s),
                                "title": f"{role} {arch} s{seed} from {source} ({training.method(s)}{stopped})"})


def _teacher(cfg: PipelineConfig, arch: str | None = None, seed: int | None = None, epochs: int | None = None,
             stop_after: int | None = None) -> TrainSpec:
    return zoo(cfg, "teacher", arch or cfg.teacher.arch, cfg.teacher.seed if seed is None else seed, epochs=epochs,
               stop_after=stop_after)


def _assistant(cfg: PipelineConfig, arch: str, guides: list[TrainSpec], survival: float = 1.0,
               kd: KDConfig | None = None) -> TrainSpec:
    return zoo(cfg, "assistant", arch, cfg.assistant.seed, guides, survival=survival, kd=kd)


def _student(cfg: PipelineConfig, seed: int, guides: list[TrainSpec] = (), arch: str | None = None, **kw) -> TrainSpec:
    return zoo(cfg, "student", arch or cfg.student.arch, seed, list(guides), **kw)


def _ref(variant: str, spec: TrainSpec, label: str = "") -> Row:
    return Row(variant, spec.seed, spec, label or f"{spec.role} {spec.arch}", spec.arch)


def _baselines(cfg: PipelineConfig, teacher: TrainSpec) -> list[Row]:
    s = cfg.student.arch
    return [r for seed in cfg.student.seeds for r in
            (Row("nokd", seed, _student(cfg, seed), f"NOKD {s}"),
             Row("blkd", seed, _student(cfg, seed, [teacher]), f"BLKD {teacher.arch} -> {s}"))]


def comparison(cfg: PipelineConfig) -> Plan:
    t = _teacher(cfg)
    ta = _assistant(cfg, cfg.assistant.arch, [t])
    takd = [Row("takd", seed, _student(cfg, seed, [ta]), f"TAKD {t.arch} -> {ta.arch} -> {cfg.student.arch}")
            for seed in cfg.student.seeds]
    return Plan("comparison", f"NOKD / BLKD / TAKD over {len(cfg.student.seeds)} seeds",
                _baselines(cfg, t) + takd, [_ref("teacher", t), _ref("assistant", ta)],
                [("takd", "blkd"), ("blkd", "nokd"), ("takd", "nokd")])


def _size_sweep(cfg: PipelineConfig, name: str, title: str, archs: list[str], guide: Callable[[str], TrainSpec],
                rows: list[Row], refs: list[Row], versus: str, x_title: str) -> Plan:
    """Students of every seed from a guide of each size, each compared with `versus`."""
    for arch in archs:
        g = guide(arch)
        refs.append(_ref(f"{g.role}-{arch}", g))
        rows += [Row(f"via-{arch}", seed, _student(cfg, seed, [g]), f"via {g.role} {arch}", arch)
                 for seed in cfg.student.seeds]
    return Plan(name, title, rows, refs, [(f"via-{a}", versus) for a in archs], "size-accuracy", x_title)


def ta_sweep(cfg: PipelineConfig) -> Plan:
    t = _teacher(cfg)
    return _size_sweep(cfg, "ta-sweep", f"TA size between {t.arch} and {cfg.student.arch}", cfg.experiments.ta_sizes,
                       lambda arch: _assistant(cfg, arch, [t]), _baselines(cfg, t), [_ref("teacher", t)], "blkd",
                       "teacher assistant")


def teacher_sweep(cfg: PipelineConfig) -> Plan:
    nokd = [Row("nokd", s, _student(cfg, s), f"NOKD {cfg.student.arch}") for s in cfg.student.seeds]
    return _size_sweep(cfg, "teacher-sweep", f"student {cfg.student.arch} against teacher size",
                       cfg.experiments.teacher_sizes, lambda arch: _teacher(cfg, arch), nokd, [], "nokd", "teacher")


def student_sweep(cfg: PipelineConfig) -> Plan:
    t = _teacher(cfg)
    rows, contrasts = [], []
    for arch in cfg.experiments.student_sizes:
        for seed in cfg.student.seeds:
            rows += [Row(f"{arch}-nokd", seed, _student(cfg, seed, arch=arch), f"NOKD {arch}", arch),
                     Row(f"{arch}-blkd", seed, _student(cfg, seed, [t], arch=arch), f"BLKD {arch}", arch)]
        contrasts.append((f"{arch}-blkd", f"{arch}-nokd"))
    return Plan("student-sweep", f"KD gain over NOKD against student size (teacher {t.arch})", rows,
                [_ref("teacher", t)], contrasts, "size-gain", "student")


def _by_size(archs: list[str]) -> list[str]:
    return sorted(archs, key=lambda a: -sum(p.numel() for p in build_model(a, 3, 10, 32).parameters()))


def paths(cfg: PipelineConfig) -> Plan:
    """Every subset of the intermediate sizes as a chain, largest first (2^n paths), plus DGKD; and TAs in
    time: the teacher's own run stopped after each of `early_stops` epochs, and all of them then the teacher,
    each for an equal share of the student's epochs (progressive distillation)."""
    t = _teacher(cfg)
    mids = _by_size(cfg.experiments.path_sizes)
    rows, refs = _baselines(cfg, t), [_ref("teacher", t)]
    for k in range(1, len(mids) + 1):
        for subset in combinations(mids, k):
            prev = t
            for arch in subset:
                prev = _assistant(cfg, arch, [prev])
            slug = "via-" + "_".join(subset)
            label = " -> ".join([t.arch, *subset, cfg.student.arch])
            rows += [Row(slug, seed, _student(cfg, seed, [prev]), label, str(k)) for seed in cfg.student.seeds]
    if cfg.experiments.dgkd and mids:
        guides, p = [t], cfg.experiments.guide_survival
        for arch in mids:
            guides.append(_assistant(cfg, arch, list(guides), p))
        label = f"DGKD {' -> '.join([t.arch, *mids])} (p={p})"
        rows += [Row("dgkd", seed, _student(cfg, seed, guides, survival=p), label)
                 for seed in cfg.student.seeds]
    in_time, stopped = _in_time(cfg, t)
    rows, refs = rows + in_time, refs + stopped
    variants = list(dict.fromkeys(r.variant for r in rows if r.variant not in ("nokd", "blkd")))
    return Plan("paths", f"distillation paths from {t.arch} to {cfg.student.arch}", rows, refs,
                [(v, "blkd") for v in variants])


def _in_time(cfg: PipelineConfig, t: TrainSpec) -> tuple[list[Row], list[Row]]:
    """The paths plan's TAs in time: KD from each early-stopped teacher, and progressive distillation; and the
    stopped teachers as reference rows."""
    epochs = t.train.epochs
    at = {f: round(f * epochs) for f in cfg.experiments.early_stops}
    kept = sorted({e for e in at.values() if 1 <= e < epochs})
    if len(kept) < len(at):
        log.warning("experiments.early_stops: %s of the teacher's %d epochs (teacher.train.epochs) give epochs %s; "
                    "only those from 1 to %d, each once, are TAs in time: %s", list(at), epochs, list(at.values()),
                    epochs - 1, kept or "none")
    stops = [_teacher(cfg, stop_after=e) for e in kept]
    rows = [Row(f"stopped-e{g.stop_after}", seed, _student(cfg, seed, [g]),
                f"{t.arch} stopped after epoch {g.stop_after} -> {cfg.student.arch}", "time")
            for g in stops for seed in cfg.student.seeds]
    if stops:
        steps = " -> ".join([*(f"epoch {g.stop_after}" for g in stops), f"epoch {t.train.epochs}"])
        kd = _hop(cfg, "kd", ensemble={"combine": "sequence"})
        rows += [Row("progressive", seed, _student(cfg, seed, [*stops, t], kd=kd),
                     f"progressive: {t.arch} at {steps} in turn -> {cfg.student.arch}", "time")
                 for seed in cfg.student.seeds]
    return rows, [_ref(f"teacher-e{g.stop_after}", g, f"teacher {g.arch} stopped after epoch {g.stop_after}")
                  for g in stops]


def equal_compute(cfg: PipelineConfig) -> Plan:
    """E epochs from labels, against a teacher trained E/2 epochs and a student distilled E/2.
    Then born-again generations of the student's own architecture, each against the student
    trained from labels for as many epochs as the whole chain (generation g: (g + 1) E)."""
    e, s, gens = cfg.experiments.equal_epochs, cfg.student.arch, cfg.experiments.generations
    rows = []
    for seed in cfg.student.seeds:
        t = _teacher(cfg, seed=seed, epochs=e // 2)
        rows += [Row("labels", seed, _student(cfg, seed, epochs=e), f"{s} from labels, {e} epochs"),
                 Row("distill", seed, _student(cfg, seed, [t], epochs=e - e // 2),
                     f"{t.arch} {e // 2} ep. -> {s} {e - e // 2} ep.")]
        prev = rows[-2].spec
        for g in range(1, gens + 1):
            # A new seed per generation: a copy of its teacher's initialisation would not be a fresh network.
            prev = _student(cfg, seed + 1000 * g, [prev], epochs=e)
            rows += [Row(f"born-again-{g}", seed, prev, f"born-again generation {g}", str(g)),
                     Row(f"labels-{g + 1}x", seed, _student(cfg, seed, epochs=(g + 1) * e),
                         f"{s} from labels, {(g + 1) * e} epochs")]
    contrasts = [("distill", "labels")] + [(f"born-again-{g}", v) for g in range(1, gens + 1)
                                           for v in ("labels", f"labels-{g + 1}x")]
    return Plan("equal-compute", f"equal epochs: {s} from labels vs teacher + distillation; born-again {s}",
                rows, [], contrasts)


def cache_views(cfg: PipelineConfig) -> Plan:
    """The soft-target cache's own question: a student distilled (BLKD) from K cached views of each image, for each
    K in `experiments.cache_views`, against the same student with the teacher run online on a fresh random view at
    every step (function matching, Beyer et al. 2022). Each arm is read against the configuration's K."""
    t, s, base = _teacher(cfg), cfg.student.arch, training.use(cfg)
    cached = {"online": False, "fresh_views": False}  # whatever cfg.cache says, these arms read a cache
    arms = [(f"k{k}", base.model_copy(update={"views": k, **cached}), f"BLKD, {k} cached view{'s' if k > 1 else ''}")
            for k in cfg.experiments.cache_views]
    arms.append(("online", base.model_copy(update={"online": True, "fresh_views": True}),
                 "BLKD, teacher online, a fresh view every step"))
    rows = [Row(v, seed, _student(cfg, seed, [t], use=u), label) for seed in cfg.student.seeds for v, u, label in arms]
    default, largest = f"k{base.views}", f"k{max(cfg.experiments.cache_views)}"  # the default: the other plans' BLKD
    variants = [v for v, _, _ in arms]
    contrasts = [(v, default) for v in variants if v != default and default in variants]
    if largest != default:
        contrasts.append(("online", largest))
    return Plan("cache-views", f"K cached views against the teacher online, {t.arch} -> {s}", rows,
                [_ref("teacher", t)], contrasts)


def _hop(cfg: PipelineConfig, loss: str, **settings) -> KDConfig:
    """The config's kd with another loss and that loss's own settings (`dml={"peers": [...]}`). A global
    kd.standardize stays off in a row where it would do nothing (a loss without that form, or λ 0)."""
    kd = cfg.kd.model_copy(update={"loss": loss, **{k: getattr(cfg.kd, k).model_copy(update=v) if isinstance(v, dict)
                                                    else v for k, v in settings.items()}})
    return kd.model_copy(update={"standardize": False}) if kd.standardize and kd.standardize_problem() else kd


def _method_rows(cfg: PipelineConfig, seed: int, t: TrainSpec) -> list[tuple[str, TrainSpec, str]]:
    """One seed's rows of the methods plan: (variant, spec, label)."""
    s, x = cfg.student.arch, cfg.experiments
    ta = _assistant(cfg, cfg.assistant.arch, [t])
    ta_dkd = _assistant(cfg, cfg.assistant.arch, [t], kd=_hop(cfg, "dkd"))
    # DKD's CIFAR-100 setting (beta 8) and DML collapsed a plain-2 student on Fashion-MNIST at lr 0.05, DIST
    # and MLKD at lr 0.1: rows at beta 2 and at x.low_lr tell the loss's setting from the step size.
    dkd2 = _hop(cfg, "dkd", dkd={"beta": 2.0, "warmup_epochs": 2.0})
    ta_dkd2 = _assistant(cfg, cfg.assistant.arch, [t], kd=dkd2)
    ls = _hop(cfg, "kd", standardize=True)
    dml = _hop(cfg, "dml", dml={"peers": x.dml_peers})
    peers = " + ".join(x.dml_peers)
    ensemble = [t if a == t.arch else _teacher(cfg, a) for a in x.ensemble_teachers]
    names = " + ".join(a for a in x.ensemble_teachers)
    nokd = _student(cfg, seed)

    def alone(loss: str) -> KDConfig:  # a feature, relation or contrastive loss as its paper runs it: beside CE only
        return _hop(cfg, loss, lam=0.0)

    return [("nokd", nokd, f"NOKD {s}"),
            ("kd", _student(cfg, seed, [t]), f"KD {t.arch} -> {s}"),
            ("takd", _student(cfg, seed, [ta]), f"TAKD {t.arch} -> {ta.arch} -> {s}"),
            ("kd-ls", _student(cfg, seed, [t], kd=ls), "KD with logit standardization"),
            ("takd-ls", _student(cfg, seed, [_assistant(cfg, cfg.assistant.arch, [t], kd=ls)], kd=ls),
             "TAKD with logit standardization at both hops"),
            ("dkd-ls", _student(cfg, seed, [t], kd=dkd2.model_copy(update={"standardize": True})),
             "DKD beta 2 with logit standardization"),
            ("dist", _student(cfg, seed, [t], kd=_hop(cfg, "dist")), "DIST"),
            ("ctkd", _student(cfg, seed, [t], kd=_hop(cfg, "ctkd")), "CTKD (KD, curriculum temperature)"),
            ("mlkd", _student(cfg, seed, [t], kd=_hop(cfg, "mlkd")), "MLKD (weak + strong views)"),
            ("crd", _student(cfg, seed, [t], kd=alone("crd")), "CRD"),
            ("reviewkd", _student(cfg, seed, [t], kd=alone("reviewkd")), "ReviewKD"),
            ("fitnets", _student(cfg, seed, [t], kd=_hop(cfg, "fitnets", fitnets={"stagewise": True})),
             "FitNets, stage-wise (hint, then KD)"),
            ("fitnets-joint", _student(cfg, seed, [t], kd=_hop(cfg, "fitnets")), "FitNets, joint (KD + hint)"),
            ("at", _student(cfg, seed, [t], kd=alone("at")), "AT"),
            ("rkd", _student(cfg, seed, [t], kd=alone("rkd")), "RKD"),
            ("sp", _student(cfg, seed, [t], kd=alone("sp")), "SP"),
            ("irg", _student(cfg, seed, [t], kd=alone("irg")), "IRG (instance relationship graph)"),
            ("adversarial", _student(cfg, seed, [t], kd=_hop(cfg, "adversarial")),
             "KD + a discriminator the student fools (MEAL V2's)"),
            ("dkd", _student(cfg, seed, [t], kd=_hop(cfg, "dkd")), "DKD"),
            ("takd-dkd", _student(cfg, seed, [ta_dkd], kd=_hop(cfg, "dkd")), "TAKD with DKD at both hops"),
            ("dkd-b2", _student(cfg, seed, [t], kd=dkd2), "DKD, beta 2, warm-up 2 epochs"),
            ("nokd-low-lr", _student(cfg, seed, lr=x.low_lr), f"NOKD {s}, lr {x.low_lr:g}"),
            ("kd-low-lr", _student(cfg, seed, [t], lr=x.low_lr), f"KD {t.arch} -> {s}, lr {x.low_lr:g}"),
            ("dkd-low-lr", _student(cfg, seed, [t], kd=_hop(cfg, "dkd"), lr=x.low_lr), f"DKD, lr {x.low_lr:g}"),
            ("dist-low-lr", _student(cfg, seed, [t], kd=_hop(cfg, "dist"), lr=x.low_lr), f"DIST, lr {x.low_lr:g}"),
            ("mlkd-low-lr", _student(cfg, seed, [t], kd=_hop(cfg, "mlkd"), lr=x.low_lr), f"MLKD, lr {x.low_lr:g}"),
            ("takd-dkd-b2", _student(cfg, seed, [ta_dkd2], kd=dkd2), "TAKD with DKD beta 2 at both hops"),
            ("dml", _student(cfg, seed, kd=dml), f"DML with {peers}"),
            ("dml-low-lr", _student(cfg, seed, kd=dml, lr=x.low_lr), f"DML with {peers}, lr {x.low_lr:g}"),
            ("born-again", _student(cfg, seed + 1000, [nokd]), f"born-again {s} -> {s}"),
            ("self", _student(cfg, seed, kd=_hop(cfg, "self")), "self-distillation, deep to shallow"),
            ("ensemble", _student(cfg, seed, ensemble), f"ensemble {names}, mean KL"),
            ("ensemble-weighted", _student(cfg, seed, ensemble,
                                           kd=_hop(cfg, "kd", ensemble={"combine": "probs", "weighted": True})),
             f"ensemble {names}, mixture weighted by val. acc.")] + _cross_modal_rows(cfg, seed, t)


CROSS = "xm-"  # the cross-modal rows' variants: read against their own view, not against KD


def _cross_modal_rows(cfg: PipelineConfig, seed: int, t: TrainSpec) -> list[tuple[str, TrainSpec, str]]:
    """A student that reads another view of each example than its teacher (the whole input): from labels, and
    distilled from the teacher's cache (cross-modal distillation, as SoundNet's KL on a teacher's class posteriors)."""
    s, rows = cfg.student.arch, []
    for v in cfg.experiments.cross_modal:
        slug = v.replace("/", "-")
        rows += [(f"{CROSS}nokd-{slug}", _student(cfg, seed, input=v), f"NOKD {s} reading {v}"),
                 (f"{CROSS}kd-{slug}", _student(cfg, seed, [t], input=v),
                  f"KD {t.arch} ({t.input or 'whole input'}) -> {s} reading {v}")]
    return rows


def methods(cfg: PipelineConfig) -> Plan:
    """Every method of engine.losses on the same teacher and student, beside NOKD, KD and TAKD.

    Feature, relation and contrastive losses run alone (lam = 0), as in their papers; FitNets
    stage-wise, hint first and then KD (the paper), and jointly, KD plus the hint. DML trains the
    student with `dml_peers` from scratch; born-again learns from the NOKD student of its seed; the
    ensemble learns from `ensemble_teachers`. `experiments.methods` keeps only the variants it names."""
    t = _teacher(cfg)
    rows = [Row(v, seed, spec, label) for seed in cfg.student.seeds for v, spec, label in _method_rows(cfg, seed, t)]
    wanted = cfg.experiments.methods
    if wanted:
        known = list(dict.fromkeys(r.variant for r in rows))
        unknown = [v for v in wanted if v not in known]
        if unknown:
            raise KDError(f"experiments.methods: no variant {unknown}; the methods plan has {', '.join(known)}")
        rows = [r for r in rows if r.variant in wanted]
    variants = list(dict.fromkeys(r.variant for r in rows))
    # Each row is read against KD at its own learning rate.
    contrasts = [(a, b) for a, b in (("kd", "nokd"), ("kd-low-lr", "nokd-low-lr")) if {a, b} <= set(variants)]
    contrasts += [(v, "kd-low-lr" if v.endswith("-low-lr") else "kd") for v in variants
                  if v not in ("nokd", "kd", "nokd-low-lr", "kd-low-lr") and not v.startswith(CROSS)
                  and ("kd-low-lr" if v.endswith("-low-lr") else "kd") in variants]
    # A method that needs the lower rate is also read against KD at the pipeline's: the choice a user has.
    contrasts += [(v, "kd") for v in variants if v.endswith("-low-lr") and v not in ("nokd-low-lr", "kd-low-lr")
                  and "kd" in variants]
    # Logit standardization is an option on a method: also read against that method without it.
    contrasts += [(a, b) for a, b in (("takd-ls", "takd"), ("dkd-ls", "dkd-b2")) if {a, b} <= set(variants)]
    # Cross-modal: what the teacher adds on the student's view, and what the view costs from labels.
    contrasts += [(c, d) for v in variants if v.startswith(f"{CROSS}kd-")
                  for c, d in ((v, v.replace("kd-", "nokd-", 1)), (v.replace("kd-", "nokd-", 1), "nokd"))
                  if {c, d} <= set(variants)]
    refs = [_ref("teacher", t)]
    refs += [_ref(f"assistant{'-' + slug if slug else ''}", spec, f"assistant {spec.arch}{' (' + how + ')' if how else ''}")
             for slug, spec, how in _method_assistants(cfg, rows)]
    refs += list({g.arch: _ref(f"teacher-{g.arch}", g) for r in rows for g in r.spec.guides
                  if g.role == "teacher" and g.arch != t.arch}.values())
    return Plan("methods", f"distillation methods, {t.arch} -> {cfg.student.arch}", rows, refs, contrasts)


def _method_assistants(cfg: PipelineConfig, rows: list[Row]) -> list[tuple[str, TrainSpec, str]]:
    """The distinct TAs the rows learn through, named by their hop's loss: (slug, spec, label suffix)."""
    out: dict[str, tuple[str, TrainSpec, str]] = {}
    for r in rows:
        for g in r.spec.guides:
            if g.role != "assistant":
                continue
            kd = g.kd
            slug = "" if kd == cfg.kd else ("ls" if kd.loss == "kd" and kd.standardize else
                                          f"{kd.loss}{'-b2' if kd.loss == 'dkd' and kd.dkd.beta == 2.0 else ''}")
            how = {"": "", "ls": "KD with logit standardization", "dkd": "DKD", "dkd-b2": "DKD beta 2"}.get(slug, slug)
            out.setdefault(slug, (slug, g, how))
    return list(out.values())


PLANS: dict[str, Callable[[PipelineConfig], Plan]] = {
    "comparison": comparison, "ta-sweep": ta_sweep, "teacher-sweep": teacher_sweep,
    "student-sweep": student_sweep, "paths": paths, "equal-compute": equal_compute, "methods": methods,
    "cache-views": cache_views,
}


def build_plan(name: str, cfg: PipelineConfig) -> Plan:
    if name not in PLANS:
        raise KDError(f"unknown experiment {name!r}; available: {', '.join(PLANS)}")
    return PLANS[name](cfg)
