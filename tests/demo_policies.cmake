# ctest: under memory pressure, the example's final loss equals an unpressured
# run's within 1e-5 relative, under every policy with and without resume, and
# under 5 % transient faults for seeds 1 to 10 with and without resume (of the
# training batches; evaluation always resumes) -- so what a failed attempt
# computed never leaks into a result.
include(${CMAKE_CURRENT_LIST_DIR}/run_and_compare.cmake)
function(loss_of out)  # the final loss of a run
    run(o ${ARGN})
    final_loss(l "${o}")
    set(${out} ${l} PARENT_SCOPE)
endfunction()
loss_of(reference ${TRAIN} --bs 1024 --device-memory 1GiB)
foreach(policy halve geometric bisect predictive)
    foreach(resume on off)
        loss_of(loss ${TRAIN} --bs 1024 --device-memory 1MiB --policy ${policy} --resume ${resume})
        same_loss("--policy ${policy} --resume ${resume}" ${loss} ${reference})
    endforeach()
endforeach()
foreach(seed RANGE 1 10)
    loss_of(reference ${TRAIN} --bs 1024 --device-memory 1GiB --seed ${seed})
    foreach(resume on off)
        loss_of(loss ${TRAIN} --bs 1024 --device-memory 1MiB --fault-rate 0.05 --seed ${seed} --resume ${resume})
        same_loss("--fault-rate 0.05 --seed ${seed} --resume ${resume}" ${loss} ${reference})
    endforeach()
endforeach()
