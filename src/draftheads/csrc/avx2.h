// What the C++ sources of csrc/ share: they need AVX2 and FMA (built with -march=native on such a CPU),
// and the sum of a vector's 8 lanes.
#pragma once
#include <immintrin.h>

#if !defined(__AVX2__) || !defined(__FMA__)
#error "draftheads' C++ kernels need AVX2 and FMA (compiled with -march=native)"
#endif

// The 8 lanes of v summed: (0 + 4) + (2 + 6), then + ((1 + 5) + (3 + 7)).
static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
