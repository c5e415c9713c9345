#!/usr/bin/env bash
# Fault check of `diffusion train`: does a run survive being killed, and a full
# disk? Not part of CI (it takes minutes, needs root for the disk part, and
# its kill moments depend on timing); run it by hand after touching the
# trainer, checkpoints, metrics or the run directory's files.
#
# What it checks, on the `tiny` preset with the cpu backend:
#
#   1. kill -9. An uninterrupted reference run (10 epochs, a checkpoint every
#      step, --seed 1). Then the same run killed with SIGKILL at a random
#      moment, continued with `train --resume DIR`, killed again, ... KILLS
#      times in all, then let finish. Checks: every restart works (a run killed
#      before it wrote config.json is started again with `train --out`, one
#      killed after with `--resume`, which starts from step 0 when there is no
#      checkpoint yet), no panic, latest.json says finished at the reference's
#      step, no `*.partial` checkpoint folder is left, the loss curve (columns
#      step and loss of metrics.csv) equals the reference's row for row, and
#      `diffusion sample --npy` gives the same bytes for both runs. A
#      `*.tmp-*` file that a kill between write and rename left is noted, not
#      failed.
#   2. Full disk. A 6 MiB tmpfs (or, where tmpfs cannot be mounted, a small
#      ext4 image on a loop device), shrunk further by a filler file. First a
#      whole run with room for two checkpoints and about half the epochs'
#      sample grids, so that it fills the disk mid-run; then a sweep of short
#      runs (--stop-after 6) whose second checkpoint runs out of space at
#      different points (inside model.mpk, ema.mpk, optimizer.mpk, at
#      latest.json, or not at all). Checks each time: `train` fails with
#      exactly one `error:` line, its last, naming a file on the small file
#      system, and no panic; no `*.partial` folder, `*.tmp-*` file or .lock
#      is left, nor a checkpoint folder that latest.json does not point at;
#      latest.json points at a complete checkpoint that `sample` loads; after
#      the filler is removed `--resume` continues (the whole run: to its end,
#      with the reference's loss curve and samples). Notes (not failures) for
#      an error that does not say the disk is full or repeats its cause.
#      Skipped (with a note) where no small file system can be mounted.
#
# Usage:
#   CARGO_TARGET_DIR=$HOME/.cache/diffusion-target cargo build --release -p diffusion-cli
#   scripts/fault-check.sh [--seed N] [--kills N] [--bin PATH] [--skip-kill] [--skip-disk] [--keep]
#
#   --seed N    seed of bash's $RANDOM, which draws the kill moments
#               (default 4242; FAULT_CHECK_SEED in the environment also works):
#               the same seed gives the same sequence of delays
#   --kills N   number of kill -9s (default 20)
#   --bin PATH  the diffusion binary (default $DIFFUSION_BIN, else
#               $CARGO_TARGET_DIR/release/diffusion, else
#               ~/.cache/diffusion-target/release/diffusion, else target/release/diffusion)
#   --keep      keep the scratch folder (printed at the end) for inspection
#
# Takes about 3 minutes on a 2-core CPU (reference run ~45 s, the killed
# run ~1 min, the full-disk part ~1 min). Exits non-zero, with a FAIL: line per
# failed check, if any check fails.
set -euo pipefail

seed=${FAULT_CHECK_SEED:-4242}
kills_wanted=20
bin=${DIFFUSION_BIN:-}
skip_kill=0
skip_disk=0
keep=0
while (($#)); do
    case $1 in
        --seed) seed=$2; shift 2 ;;
        --kills) kills_wanted=$2; shift 2 ;;
        --bin) bin=$2; shift 2 ;;
        --skip-kill) skip_kill=1; shift ;;
        --skip-disk) skip_disk=1; shift ;;
        --keep) keep=1; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "fault-check: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
RANDOM=$seed

if [[ -z $bin ]]; then
    for candidate in "${CARGO_TARGET_DIR:-}/release/diffusion" \
        "$HOME/.cache/diffusion-target/release/diffusion" \
        "$(dirname "$0")/../target/release/diffusion"; do
        if [[ -x $candidate ]]; then bin=$candidate; break; fi
    done
fi
if [[ -z $bin || ! -x $bin ]]; then
    echo "fault-check: no diffusion binary found; build it with" >&2
    echo "  cargo build --release -p diffusion-cli   (or pass --bin PATH)" >&2
    exit 2
fi

# The run every part uses: ~35 s uninterrupted on 2 cores, 160 steps, a
# checkpoint after every step (so a good share of the kills land inside a
# checkpoint write).
epochs=10
ckpt_every=1
train_args=(--backend cpu --preset tiny --epochs "$epochs" --checkpoint-every "$ckpt_every" --seed 1)
sample_args=(--backend cpu --n 8 --steps 4 --seed 7)

scratch=$(mktemp -d /tmp/fault-check.XXXXXX)
small=""      # mount point of the small file system, once mounted
child=""      # pid of a training process in flight
cleanup() {
    if [[ -n $child ]] && kill -0 "$child" 2>/dev/null; then
        kill -9 "$child" 2>/dev/null || true
        wait "$child" 2>/dev/null || true
    fi
    if [[ -n $small ]] && mountpoint -q "$small"; then
        umount "$small" || umount -l "$small" || true
    fi
    if ((keep)); then
        echo "scratch folder kept: $scratch"
    else
        rm -rf "$scratch"
    fi
}
trap cleanup EXIT

failures=0
summaries=()
fail() {
    echo "FAIL: $*" >&2
    failures=$((failures + 1))
}
# latest_field RUN KEY: the value of "KEY": in RUN/checkpoints/latest.json
latest_field() {
    sed -n "s/.*\"$2\": *\"\{0,1\}\([^\",]*\)\"\{0,1\},\{0,1\}\$/\1/p" "$1/checkpoints/latest.json" | head -n 1
}
# loss_curve RUN: columns step and loss of RUN/metrics.csv, without the header
loss_curve() {
    tail -n +2 "$1/metrics.csv" | cut -d, -f1,3
}
# leftovers DIR: checkpoint folders and temporary files a crash may leave
leftovers() {
    find "$1" \( -name '*.partial' -o -name '*.tmp-*' \) -print
}
now_s() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now_s)" 'BEGIN { printf "%.0f", b - a }'; }
start_all=$(now_s)

echo "fault-check: binary $bin, RANDOM seed $seed, scratch $scratch"

# ---------------------------------------------------------------- reference
ref=$scratch/ref
echo "reference: uninterrupted run (${epochs} epochs of tiny, a checkpoint every $ckpt_every step(s))"
t0=$(now_s)
if ! "$bin" train "${train_args[@]}" --out "$ref" >"$scratch/ref.log" 2>&1; then
    cat "$scratch/ref.log" >&2
    echo "FAIL: the uninterrupted reference run failed; nothing else can be checked" >&2
    exit 1
fi
ref_steps=$(latest_field "$ref" step)
ref_rows=$(loss_curve "$ref" | wc -l)
"$bin" sample "${sample_args[@]}" --checkpoint "$ref" --out "$scratch/ref.png" --npy "$scratch/ref.npy" >"$scratch/ref-sample.log" 2>&1 \
    || { cat "$scratch/ref-sample.log" >&2; echo "FAIL: sampling the reference run failed" >&2; exit 1; }
echo "reference: $ref_steps steps in $(elapsed "$t0") s"

# ---------------------------------------------------------------- kill -9
kill_check() {
    local run=$scratch/killed
    local kills=0 fresh_starts=0 resumes=0 stale_notes=0 seg=0 rc delay_ms
    local log
    echo "kill -9: $kills_wanted kills at random moments (0.1-2.5 s after each start)"
    while ((kills < kills_wanted)); do
        seg=$((seg + 1))
        log=$scratch/killed-$seg.log
        if [[ -f $run/config.json ]]; then
            "$bin" train --backend cpu --resume "$run" >"$log" 2>&1 &
            child=$!
            resumes=$((resumes + 1))
        else
            # Killed before config.json existed (or not started yet): the
            # folder holds at most a stale .lock, which `train --out` removes.
            "$bin" train "${train_args[@]}" --out "$run" >"$log" 2>&1 &
            child=$!
            fresh_starts=$((fresh_starts + 1))
        fi
        delay_ms=$((100 + RANDOM % 2400))
        sleep "$((delay_ms / 1000)).$(printf %03d $((delay_ms % 1000)))"
        kill -9 "$child" 2>/dev/null || true
        set +e
        wait "$child" 2>/dev/null
        rc=$?
        set -e
        child=""
        if grep -q 'removed a stale lock' "$log"; then stale_notes=$((stale_notes + 1)); fi
        if grep -q 'panicked' "$log"; then
            fail "kill -9: segment $seg panicked:"; cat "$log" >&2
            return
        fi
        if ((rc == 137)); then
            kills=$((kills + 1))
            local at="no checkpoint yet"
            if [[ -f $run/checkpoints/latest.json ]]; then at="checkpoint at step $(latest_field "$run" step)"; fi
            printf '  kill %2d after %4d ms: %s\n' "$kills" "$delay_ms" "$at"
        elif ((rc == 0)); then
            fail "kill -9: the run finished after only $kills kills (make the delays shorter or the run longer)"
            return
        else
            fail "kill -9: segment $seg (a restart after $kills kills) exited with status $rc:"
            cat "$log" >&2
            return
        fi
    done
    log=$scratch/killed-final.log
    rc=0
    if [[ -f $run/config.json ]]; then
        "$bin" train --backend cpu --resume "$run" >"$log" 2>&1 || rc=$?
    else
        "$bin" train "${train_args[@]}" --out "$run" >"$log" 2>&1 || rc=$?
    fi
    if [[ $rc != 0 && $rc != 137 ]] || grep -q 'panicked' "$log"; then
        fail "kill -9: the last, uninterrupted resume failed (status $rc):"; cat "$log" >&2
        return
    fi
    if grep -q 'removed a stale lock' "$log"; then stale_notes=$((stale_notes + 1)); fi
    local ok=1
    if [[ $(latest_field "$run" finished) != true ]]; then
        fail "kill -9: latest.json does not say finished:"; cat "$run/checkpoints/latest.json" >&2; ok=0
    fi
    if [[ $(latest_field "$run" step) != "$ref_steps" ]]; then
        fail "kill -9: finished at step $(latest_field "$run" step), the reference at $ref_steps"; ok=0
    fi
    local partial
    partial=$(find "$run" -name '*.partial' -print)
    if [[ -n $partial ]]; then fail "kill -9: checkpoint folders left behind: $partial"; ok=0; fi
    local tmps
    tmps=$(find "$run" -name '*.tmp-*' -print)
    if [[ -n $tmps ]]; then
        echo "  note: temporary files of killed processes left behind (a kill between write and rename):" >&2
        echo "$tmps" | sed 's/^/    /' >&2
    fi
    if [[ -e $run/.lock ]]; then fail "kill -9: a finished run left its .lock"; ok=0; fi
    local rows curve_msg sample_msg
    rows=$(loss_curve "$run" | wc -l)
    if diff <(loss_curve "$ref") <(loss_curve "$run") >"$scratch/killed-curve.diff"; then
        curve_msg="loss curve identical ($rows rows)"
    else
        fail "kill -9: the loss curve differs from the reference (reference $ref_rows rows, resumed $rows); first differences (< reference, > resumed):"
        head -n 20 "$scratch/killed-curve.diff" >&2
        curve_msg="loss curve DIFFERS"
        ok=0
    fi
    if ! "$bin" sample "${sample_args[@]}" --checkpoint "$run" --out "$scratch/killed.png" --npy "$scratch/killed.npy" >"$scratch/killed-sample.log" 2>&1; then
        fail "kill -9: sampling the resumed run failed:"; cat "$scratch/killed-sample.log" >&2
        sample_msg="sampling FAILED"; ok=0
    elif cmp -s "$scratch/ref.npy" "$scratch/killed.npy"; then
        sample_msg="samples identical"
    else
        fail "kill -9: samples differ from the reference's ($(cmp "$scratch/ref.npy" "$scratch/killed.npy" | head -n 1))"
        sample_msg="samples DIFFER"; ok=0
    fi
    local resumed_msg="all resumed"
    ((ok)) || resumed_msg="resumed"
    # The first start is a fresh one; later fresh starts follow kills that
    # came before config.json existed.
    summaries+=("kill -9: $kills kills, $resumed_msg ($resumes with --resume, $((fresh_starts - 1)) with --out after a kill before config.json existed, $stale_notes stale-lock notes), $curve_msg, $sample_msg")
}

# ---------------------------------------------------------------- full disk
mount_small() {
    small=$scratch/small
    mkdir -p "$small"
    local why
    if why=$(mount -t tmpfs -o size=6m tmpfs "$small" 2>&1); then
        small_kind="tmpfs"
        return 0
    fi
    local img=$scratch/small.img why2
    if why2=$( (fallocate -l 8M "$img" && mkfs.ext4 -q -F -m 0 "$img" && mount -o loop "$img" "$small") 2>&1); then
        small_kind="ext4 on a loop device"
        return 0
    fi
    small=""
    skip_reason="tmpfs: ${why//$'\n'/ }; loop ext4: ${why2//$'\n'/ }"
    return 1
}

df_avail() { df -k --output=avail "$small" | tail -n 1 | tr -d ' '; }

# fill_to KIB: empty the small file system, then leave KIB KiB free with a filler file.
fill_to() {
    rm -rf "${small:?}"/*
    local avail
    avail=$(df_avail)
    if (($1 > avail)); then return 1; fi
    dd if=/dev/zero of="$small/filler" bs=1k count=$((avail - $1)) status=none
}

# disk_case LABEL FREE_KIB MODE: one training run on the small file system
# with FREE_KIB free. MODE full: the whole run, which must fail, then resume
# to its end and compare with the reference. MODE short: a run stopped after
# $short_steps steps, which may fail; if it does, the same checks, then a
# resume to $short_steps. Sets case_msg (what happened) and returns 1 when
# a check failed.
short_steps=6
disk_case() {
    local label=$1 free_kb=$2 mode=$3
    local run=$small/run log=$scratch/disk-$label.log rc=0 ok=1 stop=()
    local error_line errors left dir step file orphans
    case_msg=""
    [[ $mode == short ]] && stop=(--stop-after "$short_steps")
    if ! fill_to "$free_kb"; then
        fail "full disk [$label]: the $small_kind holds only $(df_avail) KiB, $free_kb KiB wanted"
        return 1
    fi
    "$bin" train "${train_args[@]}" "${stop[@]}" --out "$run" >"$log" 2>&1 &
    child=$!
    wait "$child" || rc=$?
    child=""
    if grep -q 'panicked' "$log"; then fail "full disk [$label]: train panicked:"; cat "$log" >&2; return 1; fi
    if ((rc == 0)); then
        if [[ $mode == full ]]; then
            fail "full disk [$label]: the run finished although the disk was to fill (make the filler larger)"
            return 1
        fi
        case_msg="no failure"
        return 0
    fi
    errors=$(grep -c '^error:' "$log" || true)
    error_line=$(grep '^error:' "$log" | head -n 1 || true)
    if [[ $errors != 1 ]]; then
        fail "full disk [$label]: expected one 'error:' line, got $errors (exit status $rc):"; cat "$log" >&2; ok=0
    elif [[ $error_line != *"$small/"* ]]; then
        fail "full disk [$label]: the error names no file on the full file system: $error_line"; ok=0
    elif [[ $(tail -n 1 "$log") != error:* ]]; then
        fail "full disk [$label]: the error is not the last line of the output (a multi-line message?):"; tail -n 5 "$log" >&2; ok=0
    fi
    if [[ $error_line != *"os error 28"* && $error_line != *"No space left"* ]]; then
        echo "  note [$label]: the error does not say that the disk is full: $error_line" >&2
    fi
    if [[ $error_line =~ (\(os\ error\ [0-9]+\)).*\(os\ error ]]; then
        echo "  note [$label]: the error repeats its cause: $error_line" >&2
    fi
    file=${error_line#error: }
    file=${file%%: *}
    case_msg="failed writing ${file#"$run/"}"
    left=$(leftovers "$small")
    if [[ -n $left ]]; then fail "full disk [$label]: left behind: $left"; ok=0; fi
    if [[ -e $run/.lock ]]; then fail "full disk [$label]: train exited with an error but left its .lock"; ok=0; fi
    if [[ ! -f $run/checkpoints/latest.json ]]; then
        fail "full disk [$label]: no checkpoint was written before the disk filled (make the filler smaller):"
        cat "$log" >&2
        return 1
    fi
    dir=$(latest_field "$run" dir)
    step=$(latest_field "$run" step)
    case_msg+=" after the checkpoint of step $step"
    for file in model.mpk ema.mpk optimizer.mpk; do
        if [[ ! -s $run/checkpoints/$dir/$file ]]; then
            fail "full disk [$label]: latest.json points at $dir, which lacks $file"; ok=0
        fi
    done
    orphans=$(find "$run/checkpoints" -mindepth 1 -maxdepth 1 -type d ! -name "$dir" -print)
    if [[ -n $orphans ]]; then
        fail "full disk [$label]: checkpoint folders that latest.json does not point at were left behind (they take $(du -csk $orphans | tail -n 1 | cut -f1) KiB of the full disk): $orphans"
        ok=0
    fi
    if ! "$bin" sample "${sample_args[@]}" --checkpoint "$run" --out "$scratch/disk-$label.png" \
        --npy "$scratch/disk-$label.npy" >"$scratch/disk-$label-sample.log" 2>&1; then
        fail "full disk [$label]: the checkpoint latest.json points at ($dir) does not load:"
        cat "$scratch/disk-$label-sample.log" >&2; ok=0
    fi
    rm -f "$small/filler"
    rc=0
    "$bin" train --backend cpu --resume "$run" "${stop[@]}" >"$scratch/disk-$label-resume.log" 2>&1 || rc=$?
    if ((rc != 0)); then
        fail "full disk [$label]: --resume after freeing space failed (status $rc; $(df_avail) KiB free on the $small_kind, which held the run up to step $step with $free_kb KiB):"
        cat "$scratch/disk-$label-resume.log" >&2
        if [[ -n $orphans ]]; then
            echo "  (the unreferenced folder(s) $orphans left by the failed write take the freed space)" >&2
        fi
        case_msg+=", resume FAILED"
        return 1
    fi
    case_msg+=", resumed"
    if [[ $mode == full ]]; then
        if [[ $(latest_field "$run" finished) != true ]]; then
            fail "full disk [$label]: the resumed run does not say finished"; ok=0
        fi
        if ! diff <(loss_curve "$ref") <(loss_curve "$run") >"$scratch/disk-$label-curve.diff"; then
            fail "full disk [$label]: the loss curve after resume differs from the reference (< reference, > resumed):"
            head -n 20 "$scratch/disk-$label-curve.diff" >&2
            case_msg+=", loss curve DIFFERS"; ok=0
        else
            case_msg+=" to the end, loss curve identical"
        fi
        if "$bin" sample "${sample_args[@]}" --checkpoint "$run" --out "$scratch/disk-$label-end.png" \
            --npy "$scratch/disk-$label-end.npy" >"$scratch/disk-$label-sample2.log" 2>&1 \
            && cmp -s "$scratch/ref.npy" "$scratch/disk-$label-end.npy"; then
            case_msg+=", samples identical"
        else
            fail "full disk [$label]: samples of the resumed run differ from the reference's (or sampling failed)"
            case_msg+=", samples DIFFER"; ok=0
        fi
    elif [[ $(latest_field "$run" step) != "$short_steps" ]]; then
        fail "full disk [$label]: the resume stopped at step $(latest_field "$run" step), not $short_steps"; ok=0
    fi
    left=$(leftovers "$small")
    if [[ -n $left ]]; then fail "full disk [$label]: left behind after resume: $left"; ok=0; fi
    ((ok))
}

disk_check() {
    local small_kind skip_reason
    if ! mount_small; then
        summaries+=("full disk: SKIPPED (cannot mount a small filesystem here: $skip_reason)")
        return
    fi
    # Sizes on the small file system: a checkpoint's files (rounded to 4 KiB
    # pages), a sample grid. A run needs two checkpoints at once (the new one
    # is written beside the old, which goes after latest.json names the new),
    # plus config.json, metrics.csv, latest.json and its temporary, .lock.
    local ckpt_kb png_kb need d label verdict
    ckpt_kb=$(find "$ref/checkpoints" -mindepth 2 -type f -printf '%s\n' | awk '{ kb += int(($1 + 4095) / 4096) * 4 } END { print kb }')
    png_kb=$(find "$ref/samples" -type f -printf '%s\n' | awk '{ kb += int(($1 + 4095) / 4096) * 4; n++ } END { print int(kb / n) }')
    need=$((2 * ckpt_kb + 5 * 4))
    echo "full disk: $small_kind of $(df_avail) KiB; a checkpoint takes $ckpt_kb KiB, a sample grid $png_kb KiB"

    # Mid-run: room for about half the epochs' grids beyond two checkpoints.
    local mid_ok=1
    disk_case mid $((need + png_kb * epochs / 2)) full || mid_ok=0
    verdict=ok; ((mid_ok)) || verdict=FAILED
    echo "  mid-run: $case_msg"
    summaries+=("full disk ($small_kind), mid-run: $verdict: $case_msg")

    # Sweep: the second checkpoint (step 2) runs out of space at different
    # points: inside each weights file, at latest.json, just around it.
    local cases=0 bad=0 details=()
    for d in -1800 -1300 -500 -24 -20 -16 -12 -8 -4 0 4 8; do
        label=sweep$d
        cases=$((cases + 1))
        if disk_case "$label" $((need + d)) short; then
            echo "  free $((need + d)) KiB: ok: $case_msg"
        else
            bad=$((bad + 1))
            echo "  free $((need + d)) KiB: FAILED: $case_msg"
            details+=("$((need + d)) KiB: $case_msg")
        fi
    done
    if ((bad)); then
        local joined
        joined=$(printf '%s; ' "${details[@]}")
        summaries+=("full disk ($small_kind), sweep of the second checkpoint: FAILED in $bad of $cases cases (${joined%; })")
    else
        summaries+=("full disk ($small_kind), sweep of the second checkpoint: $cases cases, all ok (one error line naming the file, no leftovers, latest.json loads, resume works)")
    fi
}

((skip_kill)) || kill_check
((skip_disk)) || disk_check

echo
for line in "${summaries[@]}"; do echo "$line"; done
echo "fault-check: total $(elapsed "$start_all") s"
if ((failures)); then
    echo "fault-check: FAILED ($failures failed check(s); see the FAIL: lines above)" >&2
    exit 1
fi
echo "fault-check: all checks passed"
