# Shared helpers: config validation, case lists, paths. Imported by every other .smk file.
import functools
import os
import sys

# locnet is importable without installing it (e.g. in the environment that --sdm conda
# builds from envs/locnet.yaml): the workflow and its scripts put src/ first on the path.
sys.path.insert(0, os.path.join(workflow.basedir, "src"))

import pandas as pd

from snakemake.exceptions import WorkflowError

import locnet.config
import locnet.metrics
import locnet.seeds

try:
    _validated = locnet.config.validate(config)
except locnet.config.ConfigError as err:
    raise WorkflowError(str(err)) from None
config.clear()
config.update(_validated)

RES = config["results"].rstrip("/")
# Every script rule runs in this environment under --sdm conda (same pins as the venv).
CONDA_ENV = os.path.join(workflow.basedir, "envs", "locnet.yaml")
LEVELS = list(range(config["pyramid"]["levels"]))


wildcard_constraints:
    case=r"[A-Za-z0-9_.\-]+",
    level=r"\d+",


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
    try:
        ids = pd.read_csv(path, dtype=str)["case_id"].dropna().str.strip()
    except FileNotFoundError:
        raise WorkflowError(f"cohort.manifest: file not found: {path}") from None
    except KeyError:
        raise WorkflowError(f"cohort.manifest: {path} has no 'case_id' column") from None
    return tuple(dict.fromkeys(ids))


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
    outs += [f for m in methods for f in model_files(m)]
    outs += prediction_tables()
    outs += [f"{RES}/tables/table1.{ext}" for ext in ("csv", "md", "tex")]
    outs += [f"{RES}/tables/statistics.{ext}" for ext in ("csv", "md")]
    outs += [f"{RES}/figures/fig4_violin_errors.{ext}" for ext in ("png", "pdf")]
    outs += [f"{RES}/figures/training_curves.{ext}" for ext in ("png", "pdf")]
    if "multiscale_e2e_noise" in methods:
        outs += [f"{RES}/figures/fig5_confidence_vs_error.{ext}" for ext in ("png", "pdf")]
        outs += [f"{RES}/models/multiscale_e2e_noise/quality.json"]
    if config["inference"]["manifest"]:
        outs += [f"{RES}/inference/{m}/landmarks.csv" for m in methods if m in NOISY_METHODS]
    if {"locnet_single", "heatmap_unet"} <= set(methods):
        outs += [f"{RES}/figures/fig3_heatmaps.{ext}" for ext in ("png", "pdf")]
    return outs


# ---- methods -------------------------------------------------------------------------------
METHOD_ORDER = list(locnet.metrics.METHODS)  # Table 1's order
NOISY_METHODS = {"multiscale_e2e_noise"}
TRAIN_KEYS = ("epochs", "learning_rate", "batch_size", "schedule")


def enabled_methods():
    return [m for m in METHOD_ORDER if config["methods"][m].get("enabled", True)]


def method_cfg(method):
    """The model block of a method: shared U-Net under the method's own keys, + landmarks."""
    block = {k: v for k, v in config["methods"][method].items() if k not in ("enabled",) + TRAIN_KEYS}
    block["unet"] = {**config["unet"], **block.get("unet", {})}
    block["landmarks"] = list(config["landmarks"])
    return block


def train_cfg(method):
    """Training settings of a method: the shared training block, overridden by the method's."""
    out = dict(config["training"])
    out.update({k: v for k, v in config["methods"][method].items() if k in TRAIN_KEYS})
    return out


def grid_cfg():
    p = config["pyramid"]
    # Everything preprocessing needs is stored with each model (metadata.json), so
    # inference on new scans reads it from there and can never be applied at another grid.
    return {
        "finest_shape": p["finest_shape"],
        "finest_spacing_mm": p["finest_spacing_mm"],
        "levels": p["levels"],
        "window_hu": list(p["window_hu"]),
        "background_hu": p["background_hu"],
        # absent from the default study: a model without it is read as the CT window
        **({"intensity": dict(p["intensity"])} if p.get("intensity") else {}),
    }


def prediction_tables():
    return [f"{RES}/predictions/{m}.csv" for m in enabled_methods()]


def model_files(method):
    d = f"{RES}/models/{method}"
    return [f"{d}/model.keras", f"{d}/metadata.json", f"{d}/history.csv"]
