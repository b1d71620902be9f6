#!/usr/bin/env bash
# Fine-tune on N nodes x G GPUs under Slurm: `sbatch extensions/slurm/sbatch_multinode.sh`.
# srun starts G tasks on each of the N nodes; litft (Lightning Fabric) takes the global rank, node rank and
# master address (the first host of SLURM_NODELIST) from the Slurm environment, so there is nothing to export.
# litft checks --num_nodes against SLURM_NNODES and --devices against the tasks per node before it starts.
#
# EDIT: the lines marked EDIT, NODES and GPUS.
#SBATCH --job-name=litft-multinode
#SBATCH --partition=gpu              # EDIT: your cluster's GPU partition
#SBATCH --time=12:00:00              # EDIT: wall time; resume a killed run with --resume auto
#SBATCH --nodes=4                    # NODES: number of machines
#SBATCH --ntasks-per-node=8          # GPUS: one task per GPU of a node
#SBATCH --gpus-per-node=8            # GPUS: the same number
#SBATCH --cpus-per-task=8            # EDIT: CPU threads per GPU
#SBATCH --mem=0
#SBATCH --exclusive                  # whole nodes: FSDP traffic should not share the network with other jobs
#SBATCH --output=logs/%x-%j.out      # EDIT: the directory must exist
set -euo pipefail

CHECKPOINT=checkpoints/meta-llama/Llama-3.1-8B        # EDIT: a litft checkpoint on a filesystem all nodes see
OUT=out/llama8b-lora                                  # EDIT: shared filesystem; checkpoints are written by all ranks
# EDIT (if your cluster needs it): the network interface NCCL should use, e.g. export NCCL_SOCKET_IFNAME=ib0

# source .venv/bin/activate                           # EDIT: your environment (the same on every node)
# hybrid_shard: shard within a node (fast NVLink), replicate across nodes (slower network). For models that do
# not fit one node's GPUs, use --train.sharding full_shard.
srun litft finetune lora "$CHECKPOINT" \
    --out_dir "$OUT" --resume auto \
    --devices "$SLURM_NTASKS_PER_NODE" --num_nodes "$SLURM_NNODES" \
    --strategy fsdp --train.sharding hybrid_shard \
    --train.timeout 30m \
    --train.save_interval 500 \
    --data.train_path data/train.jsonl                # EDIT: your data and recipe (or --config my.yaml)
