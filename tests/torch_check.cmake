# ctest: the libtorch example under memory pressure (a batch of 1024 on a 2 MiB
# simulated GPU) recovers libtorch's own OOMs and ends at the unpressured run's
# final loss within 1e-5 relative (same samples, same order).
include(${CMAKE_CURRENT_LIST_DIR}/run_and_compare.cmake)
run(small ${TRAIN} --bs 1024 --device-memory 2MiB)
run(large ${TRAIN} --bs 1024 --device-memory 1GiB)
message("${small}")
if(NOT small MATCHES "OOMs survived [1-9]")
    message(FATAL_ERROR "the libtorch example recovered no OOM")
endif()
final_loss(a "${small}")
final_loss(b "${large}")
same_loss("torch example" ${a} ${b})
# The precision ladder's second rung: with wider layers and a floor of 256
# samples a micro-batch, fp32 does not fit in 5 MiB at the floor and bf16
# autocast does. The run completes; bf16 rounding moves the loss, so it is held
# to 1e-3 of the fp32 run's.
run(bf16 ${TRAIN} --bs 1024 --hidden 512 --min-batch 256 --device-memory 5MiB)
run(bf16_ref ${TRAIN} --bs 1024 --hidden 512 --min-batch 256 --device-memory 1GiB)
if(NOT bf16 MATCHES "precision_change +m=2[0-9][0-9] fp32 GPU 0 -> m=2[0-9][0-9] bf16 GPU 0")
    message(FATAL_ERROR "the ladder never reached bf16:\n${bf16}")
endif()
final_loss(a "${bf16}")
final_loss(b "${bf16_ref}")
same_loss("torch example, bf16 rung" ${a} ${b} 1e-3)
