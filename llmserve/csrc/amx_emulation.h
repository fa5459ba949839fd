// Tests only (LLMSERVE_EMULATE_AMX, tests/vnni_emulation.py): the AMX tile operations the q8 kernels
// use (q8_amx.h), computed in plain C++ on a thread's own copy of the eight tile registers, so CPUs
// without AMX run the AMX kernels' logic. Each operation checks the shapes the hardware requires of
// its tiles (where a real CPU would fault or compute garbage), so a wrong tile configuration fails a
// test here rather than only on an AMX machine.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>

namespace amx_emulation {

struct State {
  uint8_t data[8][16 * 64];  // tmm0..tmm7: up to 16 rows of up to 64 bytes
  int rows[8] = {};
  int colsb[8] = {};
  bool configured = false;
};
inline thread_local State state;

inline void require(bool ok, const char* what) {
  if (!ok) throw std::runtime_error(what);
}

// The 64-byte tile configuration (palette 1): colsb as uint16 at bytes 16.., rows at bytes 48...
inline void load_config(const void* config) {
  const auto* c = static_cast<const uint8_t*>(config);
  require(c[0] == 1, "AMX emulation: tile configuration palette must be 1");
  for (int t = 0; t < 8; ++t) {
    uint16_t colsb;
    std::memcpy(&colsb, c + 16 + 2 * t, 2);
    state.colsb[t] = colsb;
    state.rows[t] = c[48 + t];
    require(colsb <= 64 && state.rows[t] <= 16, "AMX emulation: a tile is larger than 16 rows x 64 bytes");
  }
  state.configured = true;
}

inline void release() { state.configured = false; }

inline void check_tile(int t) {
  require(state.configured, "AMX emulation: tile used before its configuration was loaded");
  require(t >= 0 && t < 8 && state.rows[t] > 0 && state.colsb[t] > 0, "AMX emulation: tile not configured");
}

inline void load(int t, const void* base, long stride) {
  check_tile(t);
  for (int r = 0; r < state.rows[t]; ++r)
    std::memcpy(state.data[t] + r * 64, static_cast<const uint8_t*>(base) + r * stride, state.colsb[t]);
}

inline void store(int t, void* base, long stride) {
  check_tile(t);
  for (int r = 0; r < state.rows[t]; ++r)
    std::memcpy(static_cast<uint8_t*>(base) + r * stride, state.data[t] + r * 64, state.colsb[t]);
}

inline void zero(int t) {
  check_tile(t);
  std::memset(state.data[t], 0, sizeof(state.data[t]));
}

// tdpbssd: C[m][n] += sum over k of A[m][k] * B[k / 4][4n + k % 4], signed bytes into int32; the
// shapes must agree as the instruction requires (A: M x K bytes, B: K / 4 x 4N, C: M x 4N).
inline void dpbssd(int c, int a, int b) {
  check_tile(a);
  check_tile(b);
  check_tile(c);
  const int M = state.rows[c], N = state.colsb[c] / 4, K = state.colsb[a];
  require(state.rows[a] == M && state.colsb[b] == 4 * N && state.rows[b] * 4 == K,
          "AMX emulation: tdpbssd tile shapes do not agree");
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      int32_t sum;
      std::memcpy(&sum, state.data[c] + m * 64 + n * 4, 4);
      for (int k = 0; k < K; ++k)
        sum += static_cast<int8_t>(state.data[a][m * 64 + k]) *
               static_cast<int8_t>(state.data[b][(k / 4) * 64 + n * 4 + k % 4]);
      std::memcpy(state.data[c] + m * 64 + n * 4, &sum, 4);
    }
}

}  // namespace amx_emulation
