#!/usr/bin/env bash
# Stop the daemons start_local_slurm.sh DIR started (munged is left running: other users may need it).
dir=$(realpath -m "$1")
for name in slurmd slurmctld; do
    if [ -f "$dir/$name.pid" ]; then
        kill "$(cat "$dir/$name.pid")" 2>/dev/null || true
    fi
done
