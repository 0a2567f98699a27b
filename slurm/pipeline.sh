#!/usr/bin/env bash
# Submit the paper's stages as a chain of Slurm jobs (paper §2.3, Table 4):
#   stage 1 (ImageNet 256, class-conditional) -> stage 2 (SAM 256, text) -> stage 3 at 256 -> 512 -> 1024
# Each job waits for the previous one to succeed (--dependency=afterok; a failed stage cancels the rest) and
# starts from its final weights: INIT_FROM = the previous stage's run directory (train.init_from reads the last
# checkpoint there). Preempted stages requeue and resume by themselves, so the chain survives preemption.
#
#   bash slurm/pipeline.sh                                  # all five jobs, run dirs under runs/
#   bash slurm/pipeline.sh --stages 2,3-256 --init-from runs/stage1_imagenet256
#   bash slurm/pipeline.sh --runs /scratch/pixart -- --partition=gpu --account=proj
#
# Options:
#   --stages LIST     comma-separated, in order, from: 1, 2, 3-256, 3-512, 3-1024 (default: all five)
#   --runs DIR        run directories are DIR/<recipe name> (default: runs, i.e. ./runs)
#   --recipe S=PATH   recipe for stage S instead of the default one (repeatable), e.g. --recipe 2=my_stage2.yaml
#   --init-from DIR   init_from of the first submitted stage (default: the recipe's own)
#   --after JOBID     the first job also waits for JOBID to succeed
#   --dry-run         print the sbatch commands, submit nothing
#   -- OPTIONS...     sbatch options for every job (partition, account, nodes, time, ...)
# Output: one line per job, `stage=S job=ID run_dir=DIR init_from=DIR`.
# Variables EXTRA, PYTHON, SETUP, SRUN_ARGS reach every job through the environment (see slurm/common.sh).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")

stages="1,2,3-256,3-512,3-1024"
runs=runs
init_from=""
after=""
dry=0
declare -A recipe=()
sbatch_opts=()

die() { echo "pipeline.sh: error: $*" >&2; exit 2; }

while (($#)); do
    case $1 in
        --stages) stages=${2:?--stages needs a value}; shift 2 ;;
        --runs) runs=${2:?--runs needs a value}; shift 2 ;;
        --recipe)
            [[ ${2:-} == *=* ]] || die "--recipe wants STAGE=PATH, got '${2:-}'"
            recipe[${2%%=*}]=${2#*=}; shift 2 ;;
        --init-from) init_from=${2:?--init-from needs a value}; shift 2 ;;
        --after) after=${2:?--after needs a job id}; shift 2 ;;
        --dry-run) dry=1; shift ;;
        --) shift; sbatch_opts=("$@"); break ;;
        -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option '$1' (sbatch options go after --)" ;;
    esac
done

# stage -> (sbatch file, default recipe, extra variables)
stage_file() {
    case $1 in
        1) echo stage1.sbatch ;;
        2) echo stage2.sbatch ;;
        3-256 | 3-512 | 3-1024) echo stage3.sbatch ;;
        *) die "unknown stage '$1' (choose from 1, 2, 3-256, 3-512, 3-1024)" ;;
    esac
}
default_recipe() {
    case $1 in
        1) echo "$ROOT/recipes/stage1_imagenet256.yaml" ;;
        2) echo "$ROOT/recipes/stage2_sam256.yaml" ;;
        3-*) echo "$ROOT/recipes/stage3_hq${1#3-}.yaml" ;;
    esac
}

# Absolute, so every job (and a human reading the queue) agrees on where each stage writes.
runs=$(realpath -m "$runs")
[[ -z $init_from ]] || init_from=$(realpath -m "$init_from")
IFS=, read -ra order <<<"$stages"
((${#order[@]})) || die "--stages is empty"
for k in "${!recipe[@]}"; do
    [[ ",$stages," == *",$k,"* ]] || die "--recipe $k=...: stage $k is not in --stages $stages"
done

prev_job=$after
prev_dir=$init_from
for s in "${order[@]}"; do
    file=$(stage_file "$s")
    rec=${recipe[$s]:-$(default_recipe "$s")}
    [[ -f $rec ]] || die "stage $s: recipe $rec not found"
    rec=$(realpath "$rec")
    # The run directory is named after the recipe file, under --runs.
    name=$(basename "$rec" .yaml)
    run_dir=$runs/$name
    vars="ALL,RECIPE=$rec,RUN_DIR=$run_dir"
    [[ -n $prev_dir ]] && vars+=",INIT_FROM=$prev_dir"
    [[ $s == 3-* ]] && vars+=",RES=${s#3-}"
    # sbatch --export splits on commas.
    [[ "$rec$run_dir$prev_dir" != *,* ]] || die "stage $s: paths must not contain commas"
    cmd=(sbatch --parsable --job-name="pixart-$name" --export="$vars")
    if [[ -n $prev_job ]]; then
        cmd+=(--dependency="afterok:$prev_job" --kill-on-invalid-dep=yes)
    fi
    cmd+=("${sbatch_opts[@]}" "$HERE/$file")
    if ((dry)); then
        printf '%q ' "${cmd[@]}"
        echo
        job="<stage$s>"
    else
        out=$("${cmd[@]}") || die "stage $s: sbatch failed"
        job=${out%%;*}  # --parsable prints "id" or "id;cluster"
    fi
    echo "stage=$s job=$job run_dir=$run_dir init_from=${prev_dir:--}"
    prev_job=$job
    prev_dir=$run_dir
done
