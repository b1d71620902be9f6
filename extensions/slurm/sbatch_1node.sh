#!/usr/bin/env bash
# Fine-tune on one node with several GPUs under Slurm: `sbatch extensions/slurm/sbatch_1node.sh`.
# srun starts one task per GPU; litft (Lightning Fabric) reads rank, local rank and the master address from
# the Slurm environment. --devices must equal --ntasks-per-node, --num_nodes must equal --nodes: litft checks
# both and stops with the fix before any process waits for another.
#
# EDIT: the job name, partition, time, the GPU count (the three lines marked GPUS), the paths and the recipe.
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

CHECKPOINT=checkpoints/meta-llama/Llama-3.2-1B        # EDIT: a litft checkpoint (litft download ...)
OUT=out/${SLURM_JOB_NAME}-${SLURM_JOB_ID}             # EDIT: or a fixed path, to resume with --resume auto
GPUS=${SLURM_NTASKS_PER_NODE}

# source .venv/bin/activate                           # EDIT: your environment
srun litft finetune lora "$CHECKPOINT" \
    --out_dir "$OUT" \
    --devices "$GPUS" --num_nodes "$SLURM_NNODES" \
    --strategy fsdp --train.sharding full_shard \
    --train.timeout 30m \
    --data.train_path data/train.jsonl                # EDIT: your data and recipe (or --config my.yaml)
