/*
 * simxpu: the fake accelerator runtime of the LatencyPrism simulator (prism_sim).
 *
 * A shared library that exports CUDA-runtime-shaped and NCCL-shaped functions with the
 * real signatures and the real x86-64 calling convention, so that the monitor's `cuda`
 * and `nccl` catalog profiles attach to it unchanged: only the library's file name
 * (libsimxpu*.so*) differs. Work is executed asynchronously by one device thread per
 * process; collectives rendezvous with the other ranks through POSIX shared memory.
 *
 * Shared layouts below are fixed, little-endian (x86-64) and mirrored in Python
 * (prism_sim/control.py for the control block, prism_sim/runtime/__init__.py for the
 * kernel and graph descriptors). Changing one means changing SIMXPU_ABI_VERSION and
 * both sides.
 */
#ifndef SIMXPU_H
#define SIMXPU_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped whenever an exported signature or a shared layout changes; the Python binding
 * refuses a library built from another version (a stale build: `pip install -e .`). */
#define SIMXPU_ABI_VERSION 2

/* ------------------------------------------------------------------ control block
 *
 * /dev/shm/<name>, created by the orchestrator (prism_sim.control.ControlBlock), read by
 * the runtime on every work item it starts. 1032 bytes:
 *
 *   offset 0   uint32 magic  = SIMXPU_CTL_MAGIC (bytes "SXPU")
 *   offset 4   uint32 nranks (1..16)
 *   offset 8   struct simxpu_rank_ctl rank[16], 64 bytes each:
 *     +0  double speed           device speed factor, 1.0 normal, 0.5 = half speed
 *     +8  double link            interconnect factor (collectives and memcpy), 1.0 normal
 *     +16 double preempt         share of the device taken by competing work, 0..0.9
 *     +24 int32  gc_storm        intensity for the Python rank loop, 0 = off
 *     +28 int32  gil_contention  intensity for the Python rank loop, 0 = off
 *     +32 double reserved[4]
 */
#define SIMXPU_CTL_MAGIC 0x55505853u
#define SIMXPU_CTL_MAX_RANKS 16

struct simxpu_rank_ctl {
    double speed;
    double link;
    double preempt;
    int32_t gc_storm;
    int32_t gil_contention;
    double reserved[4];
};

struct simxpu_ctl {
    uint32_t magic;
    uint32_t nranks;
    struct simxpu_rank_ctl rank[SIMXPU_CTL_MAX_RANKS];
};

_Static_assert(sizeof(struct simxpu_rank_ctl) == 64, "rank control block is 64 bytes");
_Static_assert(offsetof(struct simxpu_ctl, rank) == 8, "rank array at offset 8");
_Static_assert(sizeof(struct simxpu_ctl) == 1032, "control block is 1032 bytes");

/* ------------------------------------------------------------------ work descriptors
 *
 * cudaLaunchKernel's `func` points to a kernel descriptor; a cudaGraphExec_t points to a
 * graph descriptor. Both are copied when the work is enqueued, so the caller may free
 * them as soon as the launch call returns. */
struct simxpu_kernel {
    const char *name;
    double flops;
    double bytes;
};

struct simxpu_graph {
    int n;
    const struct simxpu_kernel *const *kernels;
};

/* ------------------------------------------------------------------ CUDA-shaped types */
typedef int cudaError_t;
typedef struct simxpu_stream *cudaStream_t;
typedef struct simxpu_event *cudaEvent_t;
typedef struct simxpu_graph *cudaGraphExec_t;
typedef struct dim3 {
    unsigned int x, y, z;
} dim3;
typedef struct cudaLaunchConfig_st {
    dim3 gridDim;
    dim3 blockDim;
    size_t dynamicSmemBytes;
    cudaStream_t stream;
    void *attrs;
    unsigned int numAttrs;
} cudaLaunchConfig_t;

enum {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInvalidMemcpyDirection = 21,
    cudaErrorInvalidDeviceFunction = 98,
    cudaErrorInvalidDevice = 101,
    cudaErrorInvalidResourceHandle = 400,
    cudaErrorNotReady = 600,
    cudaErrorLaunchTimeout = 702, /* sticky: a collective failed (peer gone, timeout) */
    cudaErrorUnknown = 999,
};

/* ------------------------------------------------------------------ NCCL-shaped types */
typedef int ncclResult_t;
typedef int ncclDataType_t;
typedef int ncclRedOp_t;
typedef struct simxpu_comm *ncclComm_t;
#define NCCL_UNIQUE_ID_BYTES 128
typedef struct {
    char internal[NCCL_UNIQUE_ID_BYTES];
} ncclUniqueId;

enum {
    ncclSuccess = 0,
    ncclUnhandledCudaError = 1,
    ncclSystemError = 2,
    ncclInternalError = 3,
    ncclInvalidArgument = 4,
    ncclInvalidUsage = 5,
    ncclRemoteError = 6,
};

/* ------------------------------------------------------------------ exports */
int simxpu_abi_version(void);
cudaError_t simxpu_configure(double flops_per_s, double mem_bw, double link_bw, double pcie_bw,
                             double jitter, unsigned long long seed);
cudaError_t simxpu_attach_control(const char *shm_name, int rank);
size_t simxpu_last_error_message(char *buf, size_t size);

cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetDevice(int *device);
cudaError_t cudaGetDeviceCount(int *count);
cudaError_t cudaGetLastError(void);
cudaError_t cudaPeekAtLastError(void);
const char *cudaGetErrorString(cudaError_t error);
cudaError_t cudaStreamCreate(cudaStream_t *stream);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *stream, unsigned int flags);
cudaError_t cudaStreamDestroy(cudaStream_t stream);
cudaError_t cudaStreamQuery(cudaStream_t stream);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaDeviceSynchronize(void);
cudaError_t cudaLaunchKernel(const void *func, dim3 gridDim, dim3 blockDim, void **args,
                             size_t sharedMem, cudaStream_t stream);
cudaError_t cudaLaunchKernelExC(const cudaLaunchConfig_t *config, const void *func, void **args);
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t count, int kind,
                            cudaStream_t stream);
cudaError_t cudaMemcpy(void *dst, const void *src, size_t count, int kind);
cudaError_t cudaEventCreate(cudaEvent_t *event);
cudaError_t cudaEventCreateWithFlags(cudaEvent_t *event, unsigned int flags);
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream);
cudaError_t cudaEventQuery(cudaEvent_t event);
cudaError_t cudaEventSynchronize(cudaEvent_t event);
cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t start, cudaEvent_t end);
cudaError_t cudaEventDestroy(cudaEvent_t event);
cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned int flags);
cudaError_t cudaGraphLaunch(cudaGraphExec_t graphExec, cudaStream_t stream);

ncclResult_t ncclGetUniqueId(ncclUniqueId *uniqueId);
ncclResult_t ncclCommInitRank(ncclComm_t *comm, int nranks, ncclUniqueId commId, int rank);
ncclResult_t ncclCommDestroy(ncclComm_t comm);
ncclResult_t ncclCommCount(const ncclComm_t comm, int *count);
ncclResult_t ncclCommUserRank(const ncclComm_t comm, int *rank);
ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t *asyncError);
const char *ncclGetErrorString(ncclResult_t result);
ncclResult_t ncclAllReduce(const void *sendbuff, void *recvbuff, size_t count,
                           ncclDataType_t datatype, ncclRedOp_t op, ncclComm_t comm,
                           cudaStream_t stream);
ncclResult_t ncclAllGather(const void *sendbuff, void *recvbuff, size_t sendcount,
                           ncclDataType_t datatype, ncclComm_t comm, cudaStream_t stream);
ncclResult_t ncclReduceScatter(const void *sendbuff, void *recvbuff, size_t recvcount,
                               ncclDataType_t datatype, ncclRedOp_t op, ncclComm_t comm,
                               cudaStream_t stream);
ncclResult_t ncclBroadcast(const void *sendbuff, void *recvbuff, size_t count,
                           ncclDataType_t datatype, int root, ncclComm_t comm,
                           cudaStream_t stream);
ncclResult_t ncclReduce(const void *sendbuff, void *recvbuff, size_t count,
                        ncclDataType_t datatype, ncclRedOp_t op, int root, ncclComm_t comm,
                        cudaStream_t stream);
ncclResult_t ncclSend(const void *sendbuff, size_t count, ncclDataType_t datatype, int peer,
                      ncclComm_t comm, cudaStream_t stream);
ncclResult_t ncclRecv(void *recvbuff, size_t count, ncclDataType_t datatype, int peer,
                      ncclComm_t comm, cudaStream_t stream);
ncclResult_t ncclGroupStart(void);
ncclResult_t ncclGroupEnd(void);

#ifdef __cplusplus
}
#endif

#endif /* SIMXPU_H */
