#!/usr/bin/env bash
# Fine-tune on N nodes x G GPUs under Slurm:
#
#   mkdir -p logs && sbatch extensions/slurm/sbatch_multinode.sh [more litft finetune options]
#
# srun starts G tasks on each of the N nodes; litft (Lightning Fabric) takes the global rank, node rank and
# master address (the first host of SLURM_NODELIST) from the Slurm environment, so there is nothing to export.
# litft checks --num_nodes against SLURM_NNODES and --devices against the tasks per node before it starts.
#
# EDIT: the lines marked EDIT, NODES and GPUS. Options given to sbatch override the #SBATCH lines; CONFIG and OUT
# may also come from the environment (sbatch --export ALL,CONFIG=my.yaml ...); options after the script name are
# added to the litft command.
#SBATCH --job-name=litft-multinode
#SBATCH --partition=gpu              # EDIT: your cluster's GPU partition
#SBATCH --time=12:00:00              # EDIT: wall time; a resubmitted job continues (--resume auto below)
#SBATCH --nodes=4                    # NODES: number of machines
#SBATCH --ntasks-per-node=8          # GPUS: one task per GPU of a node
#SBATCH --gpus-per-node=8            # GPUS: the same number
#SBATCH --cpus-per-task=8            # EDIT: CPU threads per GPU
#SBATCH --mem=0
#SBATCH --exclusive                  # whole nodes: FSDP traffic should not share the network with other jobs
#SBATCH --output=logs/%x-%j.out      # EDIT: the directory must exist
set -euo pipefail

# The recipe: checkpoint_dir, data and hyperparameters (litft configs cp llama-3.1-8b/lora lora.yaml, then edit),
# on a filesystem every node sees.
CONFIG=${CONFIG:-lora.yaml}                           # EDIT: your recipe
OUT=${OUT:-out/llama8b-lora}                          # EDIT: shared filesystem; every rank writes its checkpoint shards
# EDIT (if your cluster needs it): the network interface NCCL should use, e.g. export NCCL_SOCKET_IFNAME=ib0

# source .venv/bin/activate                           # EDIT: your environment (the same on every node)
# hybrid_shard: shard within a node (fast NVLink), replicate across nodes (slower network). For models that do
# not fit one node's GPUs, use --train.sharding full_shard.
# --kill-on-bad-exit=1: when one task fails, srun stops the others at once instead of leaving them waiting.
srun --kill-on-bad-exit=1 litft finetune lora --config "$CONFIG" \
    --out_dir "$OUT" --resume auto \
    --devices "$SLURM_NTASKS_PER_NODE" --num_nodes "$SLURM_NNODES" \
    --strategy fsdp --train.sharding hybrid_shard \
    --train.timeout 30m \
    --train.save_interval 500 \
    "$@"
