# Shared helpers: config validation, case lists, paths. Imported by every other .smk file.
import pandas as pd

from snakemake.exceptions import WorkflowError

import locnet.config
import locnet.seeds

try:
    _validated = locnet.config.validate(config)
except locnet.config.ConfigError as err:
    raise WorkflowError(str(err)) from None
config.clear()
config.update(_validated)

RES = config["results"].rstrip("/")
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


def case_ids():
    """Case ids, known when the DAG is built (no checkpoint needed).

    Synthetic ids follow from the cohort size; a user's ids are read from their manifest,
    which exists before the run. ingest checks the manifest and stops on bad rows.
    """
    if config["cohort"]["source"] == "synthetic":
        return synthetic_case_ids()
    path = config["cohort"]["manifest"]
    try:
        ids = pd.read_csv(path, dtype=str)["case_id"].dropna().str.strip()
    except FileNotFoundError:
        raise WorkflowError(f"cohort.manifest: file not found: {path}") from None
    except KeyError:
        raise WorkflowError(f"cohort.manifest: {path} has no 'case_id' column") from None
    return list(dict.fromkeys(ids))


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
    return outs
