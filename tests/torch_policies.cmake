# ctest: the libtorch example is the ground truth for a policy (issue 21). At
# 1.0, 1.2, 1.5, 2.0 and 3.0 MiB, under SGD and under Adam (whose state appears
# at the first commit), every run ends within 1e-5 of the unpressured run's
# loss, and the predictive policy, against plain halving:
#   - survives no more OOMs (training and evaluation together) than halving or 2,
#     whichever is larger, and never more than 5;
#   - ends at a micro-batch at least halving's.
include(${CMAKE_CURRENT_LIST_DIR}/run_and_compare.cmake)
function(outcome text ooms m)  # from "torch_train_loop: N OOMs survived (...), ..., final m=M"
    string(REGEX MATCH "torch_train_loop: ([0-9]+) OOMs survived \\(train [0-9]+, eval [0-9]+\\).* final m=([0-9]+)" _
           "${text}")
    if(CMAKE_MATCH_1 STREQUAL "")
        message(FATAL_ERROR "no summary line:\n${text}")
    endif()
    set(${ooms} ${CMAKE_MATCH_1} PARENT_SCOPE)
    set(${m} ${CMAKE_MATCH_2} PARENT_SCOPE)
endfunction()
set(table "cap       optimizer  predictive OOMs, m   halve OOMs, m")
foreach(optimizer sgd adam)
    run(ref ${TRAIN} --device-memory 1GiB --optimizer ${optimizer})
    final_loss(reference "${ref}")
    foreach(cap 1MiB 1200KiB 1536KiB 2MiB 3MiB)
        foreach(policy predictive halve)
            run(o ${TRAIN} --device-memory ${cap} --optimizer ${optimizer} --policy ${policy})
            final_loss(l "${o}")
            same_loss("${cap} ${optimizer} ${policy}" ${l} ${reference})
            outcome("${o}" ooms_${policy} m_${policy})
        endforeach()
        string(APPEND table "\n${cap}  ${optimizer}  ${ooms_predictive}, m=${m_predictive}   ${ooms_halve}, m=${m_halve}")
        set(allowed ${ooms_halve})
        if(allowed LESS 2)
            set(allowed 2)
        endif()
        if(allowed GREATER 5)
            set(allowed 5)
        endif()
        if(ooms_predictive GREATER allowed)
            message(FATAL_ERROR "${cap} ${optimizer}: predictive survived ${ooms_predictive} OOMs, halve "
                                "${ooms_halve}: at most ${allowed} allowed")
        endif()
        if(m_predictive LESS m_halve)
            message(FATAL_ERROR "${cap} ${optimizer}: predictive ends at m=${m_predictive}, below halve's m=${m_halve}")
        endif()
    endforeach()
endforeach()
message("torch policies:\n${table}")
