# Shared helpers: config validation, case lists, paths. Imported by every other .smk file.
import functools
import hashlib
import os
import sys

# Every job runs the locnet of this checkout, never another installed copy (an editable
# install of another clone, an old wheel): src/ goes first on this process's path and on
# PYTHONPATH, which every job's interpreter inherits (script and shell rules, local and
# cluster jobs, and --sdm conda, whose environment has no locnet; a cluster job parses this
# file again on its node). This is the only place that sets the path: scripts import locnet
# as they find it.
LOCNET_SRC = os.path.join(os.path.realpath(workflow.basedir), "src")
sys.path.insert(0, LOCNET_SRC)
_inherited = os.environ.get("PYTHONPATH", "").split(os.pathsep)
os.environ.update(
    PYTHONPATH=os.pathsep.join([LOCNET_SRC] + [p for p in _inherited if p and p != LOCNET_SRC])
)
# TensorFlow's oneDNN kernels on every CPU (they are off by default on AVX2-only CPUs, where a
# training step is then 5-8x slower); locnet/__init__.py does the same for every other entry
# point. Jobs inherit it; a value set by the user wins.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import pandas as pd

from snakemake.exceptions import WorkflowError

import locnet.config
import locnet.fileio
import locnet.methods
import locnet.metrics
import locnet.seeds



def config_layers():
    """``(name, mapping)`` of each config source in the order Snakemake merged them: the
    Snakefile's config.yaml, each --configfile, then --config (names checkout-relative)."""
    cli = [str(f) for f in workflow.config_settings.configfiles]
    layers = []
    for f in dict.fromkeys([str(f) for f in workflow.configfiles if str(f) not in cli] + cli):
        rel = os.path.relpath(os.path.abspath(f), workflow.basedir)
        layers.append((os.path.abspath(f) if rel.startswith("..") else rel,
                       locnet.config.load_yaml(f)))
    if workflow.config_settings.config:
        layers.append(("--config", dict(workflow.config_settings.config)))
    return layers


try:
    # which file set each key, so that a problem names the file to edit
    CONFIG_SOURCES = locnet.config.key_sources(config_layers())
    _validated = locnet.config.validate(config, sources=CONFIG_SOURCES)
except locnet.config.ConfigError as err:
    raise WorkflowError(str(err)) from None
config.clear()
config.update(_validated)

RES = config["results"].rstrip("/")
# Every script rule runs in this environment under --sdm conda (same pins as the venv).
CONDA_ENV = os.path.join(workflow.basedir, "envs", "locnet.yaml")
LEVELS = list(range(config["pyramid"]["levels"]))


wildcard_constraints:
    case=locnet.fileio.CASE_ID_PATTERN,
    level=r"\d+",
    seed=r"\d+",


def synthetic_case_ids():
    return [f"case_{i:04d}" for i in range(config["synthetic"]["n_cases"])]


def raw_manifest_path():
    if config["cohort"]["source"] == "synthetic":
        return f"{RES}/synthetic/manifest.csv"
    return config["cohort"]["manifest"]


def raw_landmarks_path():
    if config["cohort"]["source"] == "synthetic":
        return f"{RES}/synthetic/landmarks.csv"
    return config["cohort"]["landmarks"]


@functools.cache
def case_ids():
    """Case ids, known when the DAG is built (no checkpoint needed).

    Cached: input functions ask for it once per job, and a user's manifest is read once.

    Synthetic ids follow from the cohort size; a user's ids are read from their manifest,
    which exists before the run. ingest checks the manifest and stops on bad rows.
    """
    if config["cohort"]["source"] == "synthetic":
        return tuple(synthetic_case_ids())
    path = config["cohort"]["manifest"]
    if not os.path.isfile(path):
        raise WorkflowError(f"cohort.manifest: file not found: {path}")
    try:
        table, _ = locnet.fileio.parse_manifest_table(path)
    except locnet.fileio.InputError:
        return ()  # empty or unreadable: rule ingest reports it, naming the file
    # ids that cannot name files are left out here and refused by ingest with the rule
    ids = [c for c in table["case_id"] if c and locnet.fileio.case_id_problem(c) is None]
    return tuple(dict.fromkeys(ids))


@functools.cache
def raw_scans():
    """Case id -> scan path, from the raw manifest, known when the DAG is built.

    The scans are inputs of ingest (by time, and by file status: inputs_stat) and ancient()
    inputs of their pyramid jobs, which are rebuilt when the scan's content digest changes
    (written by ingest: docs/data.md). A manifest that cannot be read
    here, a duplicate case or a scan that does not exist is left to rule ingest, which
    reports every problem at once with case and file.
    """
    if config["cohort"]["source"] == "synthetic":
        return {c: f"{RES}/synthetic/images/{c}.nii.gz" for c in synthetic_case_ids()}
    try:
        manifest = locnet.fileio.read_manifest(config["cohort"]["manifest"])
    except locnet.fileio.InputError:
        return {}
    scans = {}
    for case, image in zip(manifest["case_id"], manifest["image"]):
        scans.setdefault(case, image)
    return scans


def check_split_counts():
    """split.counts must sum to the cohort's size: checked before any job runs, naming the
    file each count came from (a --configfile that gives two of them keeps the third from
    config.yaml)."""
    if config["cohort"]["source"] == "synthetic":
        n = config["synthetic"]["n_cases"]
        src = locnet.config.source_of(CONFIG_SOURCES, "synthetic", "n_cases") or "the default"
        cohort = f"synthetic.n_cases: {n}, from {src}"
    else:
        n = len(case_ids())
        if n == 0:
            return  # unreadable or empty manifest: ingest reports it, naming the file
        cohort = f"cases in cohort.manifest {config['cohort']['manifest']}"
    problem = locnet.config.split_counts_problem(config, n, cohort, CONFIG_SOURCES)
    if problem:
        raise WorkflowError(problem)


def existing_scans():
    """The scans of the raw manifest that exist (a synthetic one: always, it is made here)."""
    if config["cohort"]["source"] == "synthetic":
        return list(raw_scans().values())
    return [p for p in raw_scans().values() if os.path.isfile(p)]


def case_scan(wildcards):
    """The scan of one case as a pyramid input (nothing if it does not exist: see raw_scans)."""
    path = raw_scans().get(wildcards.case)
    if path is None or (config["cohort"]["source"] == "files" and not os.path.isfile(path)):
        return []
    return [path]


def digest_file(case):
    """The content digest of a case's scan, written by ingest (locnet.ingest.write_digest)."""
    return f"{RES}/data/digests/{case}.json"


def inputs_stat():
    """A fingerprint of the file status (size, modification and change time, inode) of the
    user's tables and scans, a param of ingest; a change re-runs ingest, which compares
    the scans by content. A file copied in with old modification times (cp -p, rsync -a,
    tar) still gets a new change time (ctime), which no user program can set back.

    Empty for the synthetic cohort: its scans are made by this workflow, which tracks them.
    """
    if config["cohort"]["source"] == "synthetic":
        return ""
    h = hashlib.sha256()
    for p in [config["cohort"]["manifest"], config["cohort"]["landmarks"]] + existing_scans():
        try:
            st = os.stat(p)
        except OSError:
            h.update(f"{os.path.abspath(p)} missing\n".encode())
            continue
        h.update(f"{os.path.abspath(p)} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns} "
                 f"{st.st_ino}\n".encode())
    return h.hexdigest()[:16]


def after_ingest(wildcards=None):
    """An input function that adds no file but makes its job wait for checkpoint ingest.

    When ingest has to run (an input may have changed), Snakemake cannot yet know which later
    jobs must follow: a job that calls this is planned only after ingest has run, from the
    files as they then are. Without it, a job planned behind ingest would run because ingest
    runs, even when ingest's outputs (tables, digests) come out byte-identical.
    """
    checkpoints.ingest.get()
    return []


#: the rules that do not wait for ingest: the ones before it
BEFORE_INGEST = {"synthetic_case", "synthetic_cohort", "ingest"}


def gate_on_ingest():
    """Make every later step wait for ingest (input ``checked``, :func:`after_ingest`).

    Called once at the end of the Snakefile, after every rule is defined (the target rule
    all too), so a rule added later waits as well.
    """
    for r in workflow.rules:
        if r.name not in BEFORE_INGEST:
            r.set_input(checked=after_ingest)


def pyramid_files(case):
    return [f"{RES}/pyramid/{case}/level{l}.nii" for l in LEVELS] + [
        f"{RES}/pyramid/{case}/grid.json"
    ]


def all_pyramids(wildcards=None):
    return [f for case in case_ids() for f in pyramid_files(case)]


def rule_seed(name):
    """A rule's seed: derived from the master seed and the rule's name (stable across runs)."""
    return locnet.seeds.derive(config["seed"], name)


def study_outputs():
    outs = [
        f"{RES}/data/manifest.csv",
        f"{RES}/data/landmarks.csv",
        f"{RES}/data/split.csv",
    ]
    outs += all_pyramids()
    methods = enabled_methods()
    outs += [f for m in methods for s in SEEDS for f in model_files(m, s)]
    outs += prediction_tables()
    outs += [f"{RES}/tables/table1.{ext}" for ext in ("csv", "md", "tex")]
    outs += [f"{RES}/tables/statistics.{ext}" for ext in ("csv", "md")]
    outs += [f"{RES}/tables/reference.csv"]  # the no-image reference of the results page
    outs += [f"{RES}/tables/slopes.csv"]  # the slopes of the results page
    outs += [f"{RES}/tables/results.md"]  # the page the README's results block copies
    outs += [f"{RES}/figures/fig4_violin_errors.{ext}" for ext in ("png", "pdf")]
    outs += [f"{RES}/figures/training_curves.{ext}" for ext in ("png", "pdf")]
    if multiscale_methods():
        outs += [f"{RES}/tables/level_errors.{ext}" for ext in ("csv", "md")]
    if locnet.methods.PROPOSED in methods:
        outs += [f"{RES}/figures/fig5_confidence_vs_error.{ext}" for ext in ("png", "pdf")]
    outs += [f"{deployed_model_dir(m)}/quality.json" for m in methods if m in NOISY_METHODS]
    if config["inference"]["manifest"]:
        outs += [f"{RES}/inference/{m}/landmarks.csv" for m in methods if m in NOISY_METHODS]
    if set(locnet.methods.HEATMAP_FIGURE) <= set(methods):
        outs += [f"{RES}/figures/fig3_heatmaps.{ext}" for ext in ("png", "pdf")]
    return outs


# ---- methods and seeds ---------------------------------------------------------------------
METHOD_ORDER = list(locnet.methods.KEYS)  # Table 1's order (the method registry)
NOISY_METHODS = set(locnet.methods.noisy())  # test-time noisy passes, quality flag, inference
# Every method is trained once per seed, each a job of its own (wildcard {seed}). Seed 0's model
# is the deployed one: rule infer, the quality threshold and the single-model figures use it.
SEEDS = list(range(config["training"]["seeds"]))
DEPLOYED_SEED = 0


def enabled_methods():
    """The methods of this run, in Table 1's order: listed in run_methods and not disabled."""
    run = set(config["run_methods"])
    return [m for m in METHOD_ORDER if m in run and config["methods"][m].get("enabled", True)]


def method_cfg(method):
    """The model block of a method (locnet.config.method_config)."""
    return locnet.config.method_config(config, method)


def train_cfg(method):
    """Training settings of a method (locnet.config.training_config)."""
    return locnet.config.training_config(config, method)


def grid_cfg():
    """The pyramid grid and preprocessing stored with each model (locnet.config.model_grid)."""
    return locnet.config.model_grid(config)


def prediction_tables():
    """The pooled prediction table of every method (all seeds, column `seed`)."""
    return [f"{RES}/predictions/{m}.csv" for m in enabled_methods()]


def seed_prediction_tables(method):
    return [f"{RES}/predictions/{method}/seed{s}.csv" for s in SEEDS]


def multiscale_methods():
    """The multi-scale chains of this run (their predictions carry the per-level errors)."""
    return [m for m in enabled_methods() if locnet.methods.get(m).multiscale]


def model_dir(method, seed):
    return f"{RES}/models/{method}/seed{seed}"


def deployed_model_dir(method):
    """The model rule infer and the single-model figures use (seed 0)."""
    return model_dir(method, DEPLOYED_SEED)


def model_files(method, seed):
    d = model_dir(method, seed)
    return [f"{d}/model.keras", f"{d}/metadata.json", f"{d}/history.csv"]


# ---- the results page (rule results_md) -----------------------------------------------------


def results_configfiles():
    """The config files of this run, in the order they were merged (checkout-relative): the
    Snakefile's default first, then those of --configfile, which override it."""
    cli = [str(f) for f in workflow.config_settings.configfiles]
    out = []
    for f in [f for f in workflow.configfiles if str(f) not in cli] + cli:
        f = os.path.abspath(f)
        rel = os.path.relpath(f, workflow.basedir)
        out.append(f if rel.startswith("..") else rel)
    return list(dict.fromkeys(out))


def results_config_args():
    args = getattr(workflow.config_settings, "config_args", None) or []
    return [args] if isinstance(args, str) else [str(a) for a in args]


def level_errors_input(wildcards):
    """The per-level error table as an input of the page, when this run makes one."""
    path = f"{RES}/tables/level_errors.csv"
    return [path] if path in study_outputs() else []


def study_summary():
    """A few settings that size the study, for the results page."""
    out = {"cohort": config["cohort"]["source"]}
    if config["cohort"]["source"] == "synthetic":
        out["cases"] = config["synthetic"]["n_cases"]
    p = config["pyramid"]
    out["finest grid"] = f"{p['finest_shape']}^3 at {p['finest_spacing_mm']} mm"
    out["levels"] = p["levels"]
    out["epochs"] = config["training"]["epochs"]
    if shift := config["training"]["augment_shift_mm"]:
        out["augmentation"] = _training_setting("augment_shift_mm", shift)
    if overrides := training_overrides_summary():
        out["a method's own training settings"] = overrides
    out["seeds per method"] = config["training"]["seeds"]
    w = config["training"]["selection_window"]
    out["model selection"] = ("lowest validation error of a single epoch" if w == 1 else
                              f"{w}-epoch centred window of the validation error")
    out["noise passes"] = config["evaluation"]["passes"]
    out["map prior"] = map_prior_summary()
    out["U-Net activation"] = activation_summary()
    out["seed"] = config["seed"]
    return out


def training_overrides_summary():
    """The methods whose own block overrides the shared training settings, in words
    ("Patch-based CNN, Noothout 2018: epochs 50, learning rate 0.002"), or ""."""
    shared = config["training"]
    parts = []
    for m in enabled_methods():
        own = locnet.config.training_config(config, m)
        diff = [_training_setting(k, own[k])
                for k in locnet.config.TRAIN_KEYS if own.get(k) != shared.get(k)]
        if diff:
            parts.append(f"{locnet.methods.get(m).label}: {', '.join(diff)}")
    return "; ".join(parts)


def _training_setting(key, value):
    """One training setting in words: "learning rate 0.002", "no augmentation"."""
    if key == "augment_shift_mm":
        return f"random shifts up to {value:g} mm" if value else "no augmentation"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{key.replace('_', ' ')} {value:g}"
    return f"{key.replace('_', ' ')} {value}"


def activation_summary():
    """The U-Nets' activation in words: "leaky_relu (Patch-based CNN, Noothout 2018: relu)"."""
    shared = locnet.config.defaults("definitions", "unet")["activation"]
    shared = config["unet"].get("activation", shared)
    own = {m: locnet.config.method_config(config, m)["unet"]["activation"]
           for m in enabled_methods()}
    other = [f"{locnet.methods.get(m).label}: {a}" for m, a in own.items() if a != shared]
    return shared + (f" ({'; '.join(other)})" if other else "")


def map_prior_summary():
    """The map prior (map_supervision) of this run's Loc-Net methods, in words."""
    on, off = {}, []
    for m in enabled_methods():
        if not locnet.methods.get(m).map_prior:
            continue
        ms = locnet.config.method_config(config, m)["map_supervision"]
        if ms["weight"] > 0:
            key = (ms["weight"], ms["sigma_voxels"], ms["threshold"])
            on.setdefault(key, []).append(locnet.methods.get(m).label)
        else:
            off.append(locnet.methods.get(m).label)
    parts = [f"weight {w:g}, Gaussian sd {s:g} voxels, threshold {t:g} of the peak "
             f"(`map_supervision`) for {', '.join(who)}" for (w, s, t), who in on.items()]
    if off:
        parts.append(f"off (the paper's centre-of-mass loss alone) for {', '.join(off)}")
    return "; ".join(parts) if parts else "no Loc-Net method in this run"
