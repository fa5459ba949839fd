// Test builds only (LLMSERVE_EMULATE_VNNI; tests/vnni_emulation.py builds them): the AVX-512 VNNI
// kernels compiled over SIMDe's portable AVX-512, so a CPU without AVX-512 runs their logic (tile
// layouts, offsets, masks, epilogues) against the same references as the paths it has. It checks
// what the kernels compute, not the machine code a VNNI CPU runs; real VNNI CPUs test that.
//
// SIMDe 0.7 (Debian's libsimde-dev) lacks the conversions, shift and masked moves below; they are
// written here lane by lane, as Intel's intrinsics guide defines them. Its alias of _mm512_madd_epi16
// takes four arguments where the intrinsic takes two: redefined at the end.
#pragma once

#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>

#include <c10/util/Half.h>

#include <cstdint>

namespace vnni_emulation {

inline simde__m512 cvtph_ps(simde__m256i a) {
  const simde__m256i_private h = simde__m256i_to_private(a);
  simde__m512_private r;
  for (int i = 0; i < 16; ++i) r.f32[i] = static_cast<float>(c10::Half(h.u16[i], c10::Half::from_bits()));
  return simde__m512_from_private(r);
}

inline simde__m512i cvtepi16_epi32(simde__m256i a) {
  const simde__m256i_private h = simde__m256i_to_private(a);
  simde__m512i_private r;
  for (int i = 0; i < 16; ++i) r.i32[i] = h.i16[i];
  return simde__m512i_from_private(r);
}

inline simde__m512 cvtepi32_ps(simde__m512i a) {
  const simde__m512i_private v = simde__m512i_to_private(a);
  simde__m512_private r;
  for (int i = 0; i < 16; ++i) r.f32[i] = static_cast<float>(v.i32[i]);
  return simde__m512_from_private(r);
}

inline simde__m512i srai_epi32(simde__m512i a, unsigned int n) {
  simde__m512i_private v = simde__m512i_to_private(a);
  for (int i = 0; i < 16; ++i) v.i32[i] = n > 31 ? (v.i32[i] < 0 ? -1 : 0) : v.i32[i] >> n;
  return simde__m512i_from_private(v);
}

inline simde__m512 maskz_loadu_ps(simde__mmask16 k, const void* p) {
  const float* f = static_cast<const float*>(p);
  simde__m512_private r;
  for (int i = 0; i < 16; ++i) r.f32[i] = (k >> i) & 1 ? f[i] : 0.f;
  return simde__m512_from_private(r);
}

inline void mask_storeu_ps(void* p, simde__mmask16 k, simde__m512 a) {
  float* f = static_cast<float*>(p);
  const simde__m512_private v = simde__m512_to_private(a);
  for (int i = 0; i < 16; ++i)
    if ((k >> i) & 1) f[i] = v.f32[i];
}

}  // namespace vnni_emulation

#define _mm512_cvtph_ps vnni_emulation::cvtph_ps
#define _mm512_cvtepi16_epi32 vnni_emulation::cvtepi16_epi32
#define _mm512_cvtepi32_ps vnni_emulation::cvtepi32_ps
#define _mm512_srai_epi32 vnni_emulation::srai_epi32
#define _mm512_maskz_loadu_ps vnni_emulation::maskz_loadu_ps
#define _mm512_mask_storeu_ps vnni_emulation::mask_storeu_ps
#undef _mm512_madd_epi16
#define _mm512_madd_epi16(a, b) simde_mm512_madd_epi16(a, b)
