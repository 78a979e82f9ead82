# ctest: the libtorch example data-parallel over c10d (examples/torch_ddp.cpp):
# real processes meeting at a FileStore, a Gloo process group, and
# <oomguard/c10d.hpp>'s consensus on it. ${DDP} is the example, ${TRAIN} the
# single-process one, ${CHECK} loss_compare. What it holds over Gloo:
#   - two ranks (one with a 1.5 MiB simulated GPU, the other with random OOMs)
#     and three ranks (2 MiB, 1 GiB with random OOMs, 1.2 MiB): every rank ends
#     with bit-identical weights and ran the same micro-batches (each prints a
#     hash of both), every rank's final loss is within 1e-5 of the single-process
#     unpressured run's, and OOMs were survived;
#   - ranks started one by one (--world-size/--rank/--store) do the same;
#   - a give-up forced on one rank: every rank throws recovery_failed at the same
#     global batch and leaves;
#   - a rank that dies: the others get the process group's error, typed as it is
#     and not a device OOM, and leave;
#   - a rank that hangs: the others' collective times out (not an OOM), and the
#     launcher's watchdog kills every rank and fails;
#   - bad flags name the value and what is valid.
# Every run has a limit of its own here too, over the launcher's watchdog.
include(${CMAKE_CURRENT_LIST_DIR}/run_and_compare.cmake)

# ddp(<out> <rc-var> args...): the launcher's output and exit status.
function(ddp out rc)
    string(TIMESTAMP t0 "%s")
    execute_process(COMMAND ${CMAKE_COMMAND} -E env --unset=OOMGUARD_CONF ${DDP} ${ARGN}
                    RESULT_VARIABLE r OUTPUT_VARIABLE o ERROR_VARIABLE e TIMEOUT 240)
    string(TIMESTAMP t1 "%s")
    math(EXPR dt "${t1} - ${t0}")
    list(JOIN ARGN " " line)
    message("torch_ddp ${line}: exit ${r}, ${dt} s")
    set(${out} "${o}\n${e}" PARENT_SCOPE)
    set(${rc} "${r}" PARENT_SCOPE)
endfunction()

# The lines "rank R: <what> <value>" of every rank: fails unless there are n of
# them and they are all the same.
function(same_on_every_rank text n what)
    string(REGEX MATCHALL "rank [0-9]+: ${what} [^\n]*" lines "${text}")
    list(LENGTH lines count)
    if(NOT count EQUAL n)
        message(FATAL_ERROR "${n} ranks should each print '${what}', ${count} did:\n${text}")
    endif()
    set(first "")
    foreach(l IN LISTS lines)
        string(REGEX REPLACE "^rank [0-9]+: " "" v "${l}")
        if(first STREQUAL "")
            set(first "${v}")
        elseif(NOT v STREQUAL first)
            message(FATAL_ERROR "the ranks differ in '${what}':\n${lines}\n${text}")
        endif()
    endforeach()
    message("  ${n} ranks, the same ${first}")
endfunction()

# A whole run that must succeed: the same weights and steps on every rank, each
# rank's final loss at the reference's, and OOMs survived.
function(check_run text n reference)
    same_on_every_rank("${text}" ${n} "weights hash")
    same_on_every_rank("${text}" ${n} "steps")
    string(REGEX MATCHALL "rank [0-9]+: final loss [0-9.eE+-]+" losses "${text}")
    list(LENGTH losses count)
    if(NOT count EQUAL n)
        message(FATAL_ERROR "${n} ranks should print a final loss, ${count} did:\n${text}")
    endif()
    foreach(l IN LISTS losses)
        string(REGEX REPLACE ".*final loss " "" v "${l}")
        same_loss("  ${l} against one process, unpressured" ${v} ${reference})
    endforeach()
    string(REGEX MATCHALL "rank [0-9]+: [0-9]+ OOMs survived" ooms "${text}")
    set(total 0)
    foreach(l IN LISTS ooms)
        string(REGEX REPLACE "rank [0-9]+: ([0-9]+) OOMs.*" "\\1" k "${l}")
        math(EXPR total "${total} + ${k}")
    endforeach()
    if(total EQUAL 0)
        message(FATAL_ERROR "no rank ran out of memory: nothing was recovered\n${text}")
    endif()
    message("  ${total} OOMs survived over the ranks")
endfunction()

# Every rank's first line names the process group's backend as it is.
function(banner text n backend)
    string(REGEX MATCHALL "rank [0-9]+ of ${n}: torch_ddp over c10d \\(${backend}, FileStore\\)" lines "${text}")
    list(LENGTH lines count)
    if(NOT count EQUAL n)
        message(FATAL_ERROR "${n} ranks should each say 'over c10d (${backend}, FileStore)', ${count} did:\n${text}")
    endif()
endfunction()

# -DBACKEND=nccl -DRANKS=N (scripts/gpu-check, one rank per GPU): the same
# example with the process group on the GPUs, so the consensus agrees over a
# device tensor. It holds the runs that succeed and, with two ranks or more, the
# forced give-up, against the example's own single-process unpressured run (a
# CUDA torch_train_loop would run on the GPU). Every rank's banner names NCCL.
# A rank that dies or hangs is NCCL's watchdog's to handle (it tears the
# process down): not drilled here.
if(BACKEND STREQUAL "nccl")
    if(NOT RANKS OR RANKS LESS 1)
        message(FATAL_ERROR "-DBACKEND=nccl needs -DRANKS=N, one rank per GPU")
    endif()
    run(ref ${DDP} --launch 1 --bs 1024 --device-memory 1GiB)
    final_loss(reference "${ref}")
    ddp(o rc --launch ${RANKS} --backend nccl --bs 1024 --device-memory 1536KiB --fault-rate 0.005 --fault-rank 0
        --watchdog 200)
    if(NOT rc EQUAL 0)
        message(FATAL_ERROR "${RANKS} ranks over NCCL failed (${rc}):\n${o}")
    endif()
    banner("${o}" ${RANKS} "NCCL")
    check_run("${o}" ${RANKS} ${reference})
    if(RANKS GREATER 1)
        ddp(o rc --launch ${RANKS} --backend nccl --bs 1024 --give-up-rank 1 --at-batch 2 --watchdog 200)
        string(REGEX MATCHALL "rank [0-9]+: recovery_failed at global batch 2" gave_up "${o}")
        list(LENGTH gave_up count)
        if(NOT count EQUAL RANKS OR NOT rc EQUAL 1 OR o MATCHES "watchdog")
            message(FATAL_ERROR "a give-up on rank 1 over NCCL: every rank should throw recovery_failed:\n${o}")
        endif()
        message("  every rank threw recovery_failed at global batch 2")
    endif()
    return()
endif()

# 1. Two ranks, then three, under pressure and random faults on one rank.
run(ref ${TRAIN} --bs 1024 --device-memory 1GiB)
final_loss(ref1024 "${ref}")
ddp(o rc --launch 2 --bs 1024 --device-memory 1GiB,1536KiB --fault-rate 0.005 --fault-rank 0 --watchdog 200)
if(NOT rc EQUAL 0)
    message(FATAL_ERROR "two ranks failed (${rc}):\n${o}")
endif()
banner("${o}" 2 "Gloo")
check_run("${o}" 2 ${ref1024})

run(ref ${TRAIN} --bs 1020 --device-memory 1GiB)
final_loss(ref1020 "${ref}")
ddp(o rc --launch 3 --bs 1020 --min-batch 32 --device-memory 2MiB,1GiB,1200KiB --fault-rate 0.005 --fault-rank 1
    --watchdog 200)
if(NOT rc EQUAL 0)
    message(FATAL_ERROR "three ranks failed (${rc}):\n${o}")
endif()
check_run("${o}" 3 ${ref1020})

# 2. Ranks started one by one, as a cluster's launcher starts them.
set(store_dir "${WORK}/torch_c10d_store")
file(REMOVE_RECURSE "${store_dir}")
file(MAKE_DIRECTORY "${store_dir}")
execute_process(COMMAND sh -c "\"$0\" --world-size 2 --rank 1 --store \"$1\" --device-memory 2MiB & \
\"$0\" --world-size 2 --rank 0 --store \"$1\"; a=$?; wait $!; b=$?; exit $((a || b))" ${DDP} "${store_dir}/store"
                RESULT_VARIABLE rc OUTPUT_VARIABLE o ERROR_VARIABLE e TIMEOUT 240)
message("two ranks started one by one: exit ${rc}")
if(NOT rc EQUAL 0)
    message(FATAL_ERROR "two ranks started one by one failed (${rc}):\n${o}\n${e}")
endif()
check_run("${o}" 2 ${ref1024})
file(REMOVE_RECURSE "${store_dir}")

# 3. A give-up forced on rank 1 (its device fills before global batch 2): every
# rank throws recovery_failed at that batch, and every rank leaves.
ddp(o rc --launch 3 --bs 1020 --give-up-rank 1 --at-batch 2 --watchdog 200)
string(REGEX MATCHALL "rank [0-9]: recovery_failed at global batch 2" gave_up "${o}")
list(LENGTH gave_up count)
if(NOT count EQUAL 3 OR NOT rc EQUAL 1 OR o MATCHES "watchdog")
    message(FATAL_ERROR "a give-up on rank 1: every rank should throw recovery_failed at batch 2 and exit:\n${o}")
endif()
foreach(r 0 1 2)
    if(NOT o MATCHES "rank ${r} exited with status 3")
        message(FATAL_ERROR "rank ${r} did not exit with recovery_failed's status (3):\n${o}")
    endif()
endforeach()
message("  every rank threw recovery_failed at global batch 2")

# 4. A rank that dies in global batch 2: the others' agreement fails with the
# process group's own error -- not a device OOM, not retried -- and they leave.
ddp(o rc --launch 3 --bs 1020 --exit-rank 2 --at-batch 2 --timeout 60000 --watchdog 200)
if(NOT o MATCHES "rank 2 exited with status 5" OR o MATCHES "watchdog" OR o MATCHES "recovery_failed")
    message(FATAL_ERROR "a rank that dies: the others should fail with the process group's error:\n${o}")
endif()
foreach(r 0 1)
    if(NOT o MATCHES "rank ${r}: error at global batch 2 \\(device OOM: no; [^)]+\\)" OR
       NOT o MATCHES "rank ${r} exited with status 4")
        message(FATAL_ERROR "rank ${r} should end with the process group's error, not an OOM:\n${o}")
    endif()
endforeach()
string(REGEX MATCH "rank 0: error at global batch 2 [^\n]*" line "${o}")
message("  ${line}")

# 5. A rank that hangs: the other's agreement times out (2 s, the group's
# timeout: an error, not an OOM), and the watchdog kills every rank and fails.
ddp(o rc --launch 2 --hang-rank 1 --at-batch 2 --timeout 2000 --watchdog 10)
if(NOT rc EQUAL 124 OR NOT o MATCHES "watchdog fired" OR NOT o MATCHES "rank 1 ended by signal 9")
    message(FATAL_ERROR "a hang should end in the watchdog's kill and a failure (124), it ended ${rc}:\n${o}")
endif()
if(NOT o MATCHES "rank 0: error at global batch 2 \\(device OOM: no; [^)]+\\)")
    message(FATAL_ERROR "rank 0 should time out in the process group, and not as an OOM:\n${o}")
endif()
string(REGEX MATCH "rank 0: error at global batch 2 [^\n]*" line "${o}")
message("  ${line}")

# 6. Bad flags: each names the value and what is valid, with exit status 2.
foreach(case
        "--world-size 0 --rank 0 --store x|bad value '0' for --world-size: give a whole number in \\[1, 1024\\]"
        "--world-size 2 --rank 2 --store x|--rank 2 is out of range for --world-size 2: give 0 to 1"
        "--world-size 2 --rank 0|--store PATH is missing"
        "--world-size 2 --rank 0 --store /nonexistent-dir/s|its directory '/nonexistent-dir' does not exist"
        "--launch 2 --rank 0|give --launch N, or --world-size, --rank and --store for one rank started by you, not both"
        "--launch 3 --bs 1024|--bs 1024 does not split evenly over 3 ranks: give a multiple of 3"
        "--launch 2 --device-memory 1GiB,2MiB,3MiB|--device-memory gives 3 sizes for 2 ranks"
        "--launch 2 --give-up-rank 2|--give-up-rank 2 is out of range for 2 ranks: give 0 to 1")
    string(REPLACE "|" ";" parts "${case}")
    list(GET parts 0 flags)
    list(GET parts 1 expected)
    separate_arguments(flags)
    execute_process(COMMAND ${DDP} ${flags} RESULT_VARIABLE rc OUTPUT_VARIABLE o ERROR_VARIABLE e TIMEOUT 60)
    if(NOT rc EQUAL 2 OR NOT e MATCHES "${expected}")
        message(FATAL_ERROR "torch_ddp ${flags}: expected exit 2 and '${expected}', got ${rc}:\n${o}${e}")
    endif()
endforeach()
message("  bad flags: each refused, naming the value and what is valid")
