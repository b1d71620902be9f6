#!/usr/bin/env bash
# Fine-tune on one node with several GPUs under Slurm:
#
#   mkdir -p logs && sbatch extensions/slurm/sbatch_1node.sh [more litft finetune options]
#
# srun starts one task per GPU; litft (Lightning Fabric) reads rank, local rank and the master address from the
# Slurm environment. --devices must equal --ntasks-per-node and --num_nodes must equal --nodes: litft checks both
# and stops with the fix before any process waits for another (the srun line below passes both from Slurm).
#
# EDIT: the lines marked EDIT, and the GPU count (the two lines marked GPUS). Options given to sbatch override the
# #SBATCH lines (sbatch --partition debug ...); CONFIG and OUT may also come from the environment
# (sbatch --export ALL,CONFIG=my.yaml,OUT=out/run1 ...); options after the script name are added to the litft
# command (e.g. --train.max_steps 1000).
#SBATCH --job-name=litft-finetune
#SBATCH --partition=gpu              # EDIT: your cluster's GPU partition (`sinfo -s` lists them)
#SBATCH --time=04:00:00              # EDIT: wall time; resume a killed run with --resume auto
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4          # GPUS: one task per GPU
#SBATCH --gpus-per-node=4            # GPUS: the same number
#SBATCH --cpus-per-task=8            # EDIT: data loading + tokenization threads per GPU
#SBATCH --mem=0                      # all of the node's memory
#SBATCH --output=logs/%x-%j.out      # EDIT: where the log goes (the directory must exist)
set -euo pipefail

# The recipe: checkpoint_dir, data and hyperparameters (litft configs cp llama-3.2-1b/lora lora.yaml, then edit)
CONFIG=${CONFIG:-lora.yaml}                           # EDIT: your recipe
OUT=${OUT:-out/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}     # EDIT: or a fixed path, to resume with --resume auto

# source .venv/bin/activate                           # EDIT: your environment
# --kill-on-bad-exit=1: when one task fails, srun stops the others at once instead of leaving them waiting.
srun --kill-on-bad-exit=1 litft finetune lora --config "$CONFIG" \
    --out_dir "$OUT" \
    --devices "$SLURM_NTASKS_PER_NODE" --num_nodes "$SLURM_NNODES" \
    --strategy fsdp --train.sharding full_shard \
    --train.timeout 30m \
    "$@"
