// adamw.cu -- fused AdamW step over a flat parameter buffer, with optional low-precision copies of
// the updated weights written in the same pass.
//
// Semantics and operation order of torch.optim.AdamW (_single_tensor_adam, decoupled weight decay,
// amsgrad=False, maximize=False), element-wise in f32 on f32 master weights p and moments m, v:
//   p <- p * (1 - lr*wd)                                  (decay FIRST, before the moments)
//   m <- m + (1-b1)*(g - m)          (torch lerp_(g, 1-b1); end - (g-m)*b1 form when 1-b1 >= 0.5)
//   v <- v*b2 + ((1-b2)*g)*g                              (mul_(b2).addcmul_(g, g, value=1-b2))
//   denom = sqrt(v) / sqrt(1 - b2^t) + eps
//   p <- p + ((-lr/(1 - b1^t)) * m) / denom                (addcdiv_(m, denom, value=-step_size))
// The scalars (1 - lr*wd, 1 - b1, 1 - b2, lr/(1 - b1^t), sqrt(1 - b2^t)) are computed in double, as
// torch computes them in Python, then rounded to f32 (as torch's tensor ops do with Python scalars).
// Hyperparameters are passed as double for that reason; step t >= 1 is the count AFTER this update.
//
// adamw_<G>(p, g, m, v, p_bf16, p_f16, n, lr, beta1, beta2, eps, weight_decay, step):
//   G is the gradient type: adamw_f32 (float grads), adamw_bf16 (__nv_bfloat16 grads), adamw_f16 (__half grads).
//   p, m, v: float [n], updated in place; p_bf16 / p_f16: if not NULL, the updated p rounded to
//   bf16 / f16 (nearest even), e.g. the weights the next forward reads. No buffer may alias another.
//   geometry: grid-stride loop, blockDim = (256, 1, 1) (any multiple of 32), any gridDim.x >= 1
//   (e.g. min(CEIL_DIV(n, 256), 8 * SM count)). No shared memory, no barriers.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "common.cuh"

template <typename G>
__device__ __forceinline__ void adamw_step(float* __restrict__ p, const G* __restrict__ g, float* __restrict__ m,
                                           float* __restrict__ v, __nv_bfloat16* __restrict__ p_bf16,
                                           __half* __restrict__ p_f16, long long n, double lr, double beta1,
                                           double beta2, double eps, double weight_decay, int step) {
  const float decay = (float)(1.0 - lr * weight_decay);
  const float w1 = (float)(1.0 - beta1);
  const bool small_w1 = fabsf(w1) < 0.5f;
  const float b2 = (float)beta2;
  const float omb2 = (float)(1.0 - beta2);
  const float neg_step_size = (float)(-(lr / (1.0 - pow(beta1, (double)step))));
  const float bc2_sqrt = (float)sqrt(1.0 - pow(beta2, (double)step));
  const float epsf = (float)eps;
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float gi = load_f32(g, (size_t)i);
    float pi = p[i] * decay;
    float mi = m[i];
    mi = small_w1 ? mi + w1 * (gi - mi) : gi - (gi - mi) * (1.f - w1);
    const float vi = v[i] * b2 + omb2 * gi * gi;
    const float denom = sqrtf(vi) / bc2_sqrt + epsf;
    pi = pi + neg_step_size * mi / denom;
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
    if (p_bf16) p_bf16[i] = __float2bfloat16(pi);
    if (p_f16) p_f16[i] = __float2half(pi);
  }
}

extern "C" __global__ void adamw_f32(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                                     float* __restrict__ v, __nv_bfloat16* __restrict__ p_bf16,
                                     __half* __restrict__ p_f16, long long n, double lr, double beta1, double beta2,
                                     double eps, double weight_decay, int step) {
  adamw_step<float>(p, g, m, v, p_bf16, p_f16, n, lr, beta1, beta2, eps, weight_decay, step);
}

extern "C" __global__ void adamw_bf16(float* __restrict__ p, const __nv_bfloat16* __restrict__ g,
                                      float* __restrict__ m, float* __restrict__ v,
                                      __nv_bfloat16* __restrict__ p_bf16, __half* __restrict__ p_f16, long long n,
                                      double lr, double beta1, double beta2, double eps, double weight_decay,
                                      int step) {
  adamw_step<__nv_bfloat16>(p, g, m, v, p_bf16, p_f16, n, lr, beta1, beta2, eps, weight_decay, step);
}

extern "C" __global__ void adamw_f16(float* __restrict__ p, const __half* __restrict__ g,
                                      float* __restrict__ m, float* __restrict__ v,
                                      __nv_bfloat16* __restrict__ p_bf16, __half* __restrict__ p_f16, long long n,
                                      double lr, double beta1, double beta2, double eps, double weight_decay,
                                      int step) {
  adamw_step<__half>(p, g, m, v, p_bf16, p_f16, n, lr, beta1, beta2, eps, weight_decay, step);
}
