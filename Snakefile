# locnet-study: from raw CT volumes and landmark annotations to every table and figure of
# "Volumetric landmark detection with a multi-scale shift equivariant neural network".
#
#   snakemake --cores 8 --resources gpu=1                          # default synthetic study
#   snakemake --cores 8 --resources gpu=1 --configfile config/paper.yaml
#
# The config is validated (and defaults filled) by workflow/rules/common.smk.

import os

# The default config lives beside this file, so the workflow also runs with --directory.
configfile: os.path.join(workflow.basedir, "config.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/infer.smk"
include: "workflow/rules/evaluate.smk"


rule all:
    input:
        study_outputs(),
    default_target: True
