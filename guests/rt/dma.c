/*
 * dma.c - the DMA device's hypercall (SVM_HC_DMA, docs/guest-abi.md): one
 * wrapper per operation.  Ring 1 only, like every hypercall.
 */
#include "rt.h"

long dma_attach(uint64_t gpa, uint64_t len)
{
    return svm_hypercall(SVM_HC_DMA, SVM_DMA_ATTACH, (long)gpa, (long)len, 0).rax;
}

long dma_copy(uint64_t src_iova, uint64_t dst_iova, uint64_t len)
{
    return svm_hypercall(SVM_HC_DMA, SVM_DMA_COPY, (long)src_iova, (long)dst_iova, (long)len).rax;
}

long dma_fill(uint64_t iova, uint64_t len, unsigned byte)
{
    return svm_hypercall(SVM_HC_DMA, SVM_DMA_FILL, (long)iova, (long)len, (long)byte).rax;
}

long dma_detach(void)
{
    return svm_hypercall(SVM_HC_DMA, SVM_DMA_DETACH, 0, 0, 0).rax;
}
