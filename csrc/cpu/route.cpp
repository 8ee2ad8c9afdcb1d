// route on the CPU: logits (optionally from the fused router projection), argmax
// with ties to the lowest index, softmax probabilities, and a stable counting
// sort of tokens by choice. NaN as in reference.route (torch.argmax / softmax): the
// first NaN of a row is its choice, and the row's probabilities are all NaN. The counting sort is bit-equal to
// torch.sort(choice, stable=True): tokens keep their order within a choice.
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

#include "common/checks.h"
#include "ops.h"

namespace flextron {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& noise, double tau, bool hard) {
  constexpr const char* op = "route";
  check_route_args(op, input, weight, noise, tau);
  // (T, C) logits, optionally from the fused router projection
  const at::Tensor logits = weight.has_value() ? at::mm(input, weight->t()) : input;
  const int64_t tokens = logits.size(0), choices = logits.size(1);
  at::Tensor z = logits.to(at::kFloat).contiguous();  // (T, C), a fresh fp32 buffer
  if (noise.has_value()) z = z.add(noise->to(at::kFloat));

  at::Tensor choice = at::empty({tokens}, input.options().dtype(at::kLong));
  at::Tensor probs = at::empty({tokens, choices}, input.options().dtype(at::kFloat));
  const float* z_ptr = z.data_ptr<float>();
  int64_t* choice_ptr = choice.data_ptr<int64_t>();
  float* probs_ptr = probs.data_ptr<float>();
  const float inv_tau = static_cast<float>(1.0 / tau);
  at::parallel_for(0, tokens, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* row = z_ptr + t * choices;
      int64_t best = 0;
      for (int64_t c = 1; c < choices && !std::isnan(row[best]); ++c) {
        // A NaN beats every number; otherwise strict: ties keep the lowest index.
        if (std::isnan(row[c]) || row[c] > row[best]) best = c;
      }
      choice_ptr[t] = best;
      float* p = probs_ptr + t * choices;
      if (hard) {  // forward value is the one-hot; the gradient is the soft one (see ops.py)
        const float nan = std::numeric_limits<float>::quiet_NaN();  // a NaN row's soft part is NaN
        for (int64_t c = 0; c < choices; ++c) p[c] = std::isnan(row[best]) ? nan : c == best ? 1.f : 0.f;
        continue;
      }
      float total = 0.f;
      for (int64_t c = 0; c < choices; ++c) {
        p[c] = std::exp((row[c] - row[best]) * inv_tau);
        total += p[c];
      }
      for (int64_t c = 0; c < choices; ++c) p[c] /= total;
    }
  });

  // Stable counting sort: offsets = exclusive scan of counts; one ordered pass.
  at::Tensor offsets = at::zeros({choices + 1}, choice.options());
  int64_t* off = offsets.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) ++off[choice_ptr[t] + 1];
  for (int64_t c = 0; c < choices; ++c) off[c + 1] += off[c];
  at::Tensor perm = at::empty({tokens}, choice.options());
  at::Tensor inv_perm = at::empty({tokens}, choice.options());
  int64_t* perm_ptr = perm.data_ptr<int64_t>();
  int64_t* inv_ptr = inv_perm.data_ptr<int64_t>();
  std::vector<int64_t> next(off, off + choices);
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t slot = next[choice_ptr[t]]++;
    perm_ptr[slot] = t;
    inv_ptr[t] = slot;
  }
  return {choice, probs.to(input.scalar_type()), perm, inv_perm, offsets};
}

}  // namespace flextron
