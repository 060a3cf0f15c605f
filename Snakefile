# locnet-study: from raw CT volumes and landmark annotations to every table and figure of
# "Volumetric landmark detection with a multi-scale shift equivariant neural network".
#
#   snakemake --cores 8 --resources gpu=1                          # default synthetic study
#   snakemake --cores 8 --resources gpu=1 --configfile config/paper.yaml
#
# The config is validated (and defaults filled) by workflow/rules/common.smk.

import os

import yaml
from snakemake.exceptions import WorkflowError

# The default config lives beside this file, so the workflow also runs with --directory.
DEFAULT_CONFIG = os.path.join(workflow.basedir, "config.yaml")
# Read once here first: a YAML error then names the file, line and column, where Snakemake
# says only "Config file is not valid JSON or YAML". (Snakemake reads each --configfile
# before this file; scripts/study.sh checks those with python -m locnet.config.)
try:
    with open(DEFAULT_CONFIG, encoding="utf-8") as _fh:
        yaml.safe_load(_fh)
except yaml.YAMLError as _err:
    raise WorkflowError(f"config file {DEFAULT_CONFIG}: not valid YAML: "
                        + " ".join(str(_err).split())) from None


configfile: DEFAULT_CONFIG


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/infer.smk"
include: "workflow/rules/evaluate.smk"


rule all:
    input:
        study_outputs(),
    default_target: True


# every rule after ingest (all included) is planned once ingest has checked the inputs
gate_on_ingest()
