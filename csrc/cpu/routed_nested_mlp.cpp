// routed_nested_mlp on the CPU: token t runs the MLP at width widths[choice[t]]
// (widths strictly descending, choice 0 = widest), output scaled by scale[t].
//
// Why the kernel looks like this:
//  * A stable counting sort groups the tokens by choice, widest first. In that
//    order the neuron band [widths[c+1], widths[c]) is used by a *prefix* of the
//    tokens (those with choice <= c), so one band is one GEMM on strided prefix
//    views of the weights: no masking, no wasted FLOPs, no weight copies.
//  * The forward runs on tiles of sorted tokens: gather the rows, gate/up GEMMs
//    band by band (each weight band read once per tile), the activation in
//    place, one down GEMM per width segment, then scale and scatter back. A tile's hidden activations stay in the core's cache. Threads
//    pull tiles from a shared counter: the tokens are sorted widest first, so
//    static contiguous chunks would hand one thread all the expensive tiles.
//    Inside a tile the BLAS runs single-threaded (called from a parallel region).
//  * The backward recomputes the hidden activations the same way, tile by tile,
//    keeping the pre-activation gradients in sorted (T, W) buffers. The weight
//    gradients then go band by band: band c reads the first offsets[c+1] sorted
//    rows and writes its own slice of each weight gradient, so the writes are
//    disjoint (no reduction across threads) and each GEMM is large enough for
//    the multithreaded BLAS. Neurons no token uses get an exactly-zero gradient.
//
// Versions: v1 whole-problem band form, one GEMM pair per band over all tokens
// (prototype: hidden activations round-trip through memory, one BLAS call at a
// time); v2 token tiles of 128 dealt round-robin to at::parallel_for threads;
// v3 (current) tiles of 64..256 rows pulled dynamically, longest first.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "common/checks.h"
#include "common/mlp_kernels.h"
#include "ops.h"
#include "skinny_gemm.h"

// fp32, bf16 and fp16: the dtypes check_float admits.
#define FLEXTRON_DISPATCH_FLOAT(TYPE, NAME, ...)                  \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                  \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace flextron {
namespace {

// Sorted tokens per tile: at most kMaxTileRows (big enough for efficient GEMMs,
// small enough that a tile's gate/up buffers stay near the core), at least
// kMinTileRows, aiming at 4 tiles per thread so the dynamic schedule can balance.
constexpr int64_t kMaxTileRows = 256;
constexpr int64_t kMinTileRows = 64;

// Tokens grouped by choice: sorted position i holds token perm[i]; the tokens of
// choice c sit at sorted positions [offsets[c], offsets[c + 1]).
struct Routing {
  at::Tensor perm;               // (T,) int64
  std::vector<int64_t> offsets;  // (C + 1,)
};

// Sorted rows [begin, end) (relative to their tile) that all run at `width`.
struct Segment {
  int64_t begin, end, width;
};

// Stable counting sort of the tokens by choice (checking every index on the way).
Routing sort_by_choice(const char* op, const at::Tensor& choice, int64_t num_choices) {
  const at::Tensor choice_c = choice.contiguous();
  const int64_t* choice_ptr = choice_c.const_data_ptr<int64_t>();
  const int64_t tokens = choice_c.numel();
  Routing routing{at::empty({tokens}, choice_c.options()),
                  std::vector<int64_t>(num_choices + 1, 0)};
  std::vector<int64_t>& offsets = routing.offsets;
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t c = choice_ptr[t];
    TORCH_CHECK(c >= 0 && c < num_choices, op, ": choice[", t, "] = ", c, " is out of range [0, ",
                num_choices, ") for ", num_choices, " widths");
    ++offsets[c + 1];
  }
  for (int64_t c = 0; c < num_choices; ++c) offsets[c + 1] += offsets[c];
  std::vector<int64_t> next(offsets.begin(), offsets.end() - 1);
  int64_t* perm = routing.perm.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) perm[next[choice_ptr[t]]++] = t;
  return routing;
}

// The non-empty width segments of sorted rows [start, stop), widest first.
std::vector<Segment> segments(const Routing& routing, at::IntArrayRef widths, int64_t start,
                              int64_t stop) {
  std::vector<Segment> result;
  for (size_t c = 0; c < widths.size(); ++c) {
    const int64_t begin = std::max(routing.offsets[c], start);
    const int64_t end = std::min(routing.offsets[c + 1], stop);
    if (begin < end) result.push_back({begin - start, end - start, widths[c]});
  }
  return result;
}

// Calls fn(rows, lo, hi) per neuron band: neurons [lo, hi) are used by rows [0, rows).
template <typename Fn>
void for_each_band(const std::vector<Segment>& segs, const Fn& fn) {
  for (size_t k = 0; k < segs.size(); ++k) {
    fn(segs[k].end, k + 1 < segs.size() ? segs[k + 1].width : int64_t{0}, segs[k].width);
  }
}

// out[:rows, lo:hi] = in[:rows] @ weight[lo:hi]^T. out: (M, >=hi); in: (M, D); weight: (F, D).
void band_mm(const at::Tensor& out, const at::Tensor& in, const at::Tensor& weight, int64_t rows,
             int64_t lo, int64_t hi) {
  linear_nt_out(out.narrow(0, 0, rows).narrow(1, lo, hi - lo), in.narrow(0, 0, rows),
                weight.narrow(0, lo, hi - lo));
}

at::Tensor block(const at::Tensor& t, int64_t rows, int64_t lo, int64_t hi) {
  return t.narrow(0, 0, rows).narrow(1, lo, hi - lo);
}

// Runs fn(start, stop) on tiles of sorted tokens. Threads take the next tile
// from a shared counter: the tiles come widest (most expensive) first, so this
// is the longest-first greedy schedule. Each tile's arithmetic does not depend on
// the thread that runs it, so results are deterministic. A lone tile runs on the
// calling thread, where the BLAS can use every thread itself.
template <typename Fn>
void for_each_tile(int64_t tokens, const Fn& fn) {
  const int64_t threads = at::get_num_threads();
  // One thread has nothing to balance: the largest tiles read each weight band least often.
  const int64_t tile_rows =
      threads == 1 ? kMaxTileRows
                   : std::clamp((tokens + 4 * threads - 1) / (4 * threads), kMinTileRows, kMaxTileRows);
  const int64_t tiles = (tokens + tile_rows - 1) / tile_rows;
  if (tiles <= 1) {
    if (tokens > 0) fn(0, tokens);
    return;
  }
  std::atomic<int64_t> next_tile{0};
  at::parallel_for(0, std::min(threads, tiles), 1, [&](int64_t, int64_t) {
    // Pool threads start with default dispatch state: keep the ATen calls below
    // autograd (the tensors may require grad; these are kernel internals).
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t tile = next_tile++; tile < tiles; tile = next_tile++) {
      fn(tile * tile_rows, std::min(tokens, (tile + 1) * tile_rows));
    }
  });
}

// dst[perm[i]] = src[i] (* scale[perm[i]]). dst: (T, D), src: (M, D), both contiguous;
// scale: (T,) in dst's dtype, or undefined.
void scatter_rows(const at::Tensor& dst, const at::Tensor& src, const int64_t* perm,
                  const at::Tensor& scale) {
  FLEXTRON_DISPATCH_FLOAT(dst.scalar_type(), "routed_nested_mlp_scatter", [&] {
    scalar_t* out = dst.data_ptr<scalar_t>();
    const scalar_t* in = src.const_data_ptr<scalar_t>();
    const scalar_t* scale_ptr = scale.defined() ? scale.const_data_ptr<scalar_t>() : nullptr;
    const int64_t rows = src.size(0), dim = src.size(1);
    for (int64_t i = 0; i < rows; ++i) {
      scalar_t* out_row = out + perm[i] * dim;
      const scalar_t* in_row = in + i * dim;
      if (scale_ptr == nullptr) {
        std::copy(in_row, in_row + dim, out_row);
        continue;
      }
      const float s = static_cast<float>(scale_ptr[perm[i]]);
      for (int64_t j = 0; j < dim; ++j) {
        out_row[j] = static_cast<scalar_t>(static_cast<float>(in_row[j]) * s);
      }
    }
  });
}

// For each row r of the tile (token perm[r]): grad_scale[token] = <grad_hidden[r], hidden[r]>
// over the row's width (= <grad_out, unscaled output>), then grad_hidden[r] and
// grad_mlp[r] are multiplied by scale[token]. grad_hidden: (M, >=w) contiguous;
// hidden: rows of a contiguous (T, W) buffer; grad_mlp: (M, D) rows of a contiguous buffer.
void apply_scale_grad(const std::vector<Segment>& segs, const int64_t* perm,
                      const at::Tensor& scale, const at::Tensor& grad_hidden,
                      const at::Tensor& hidden, const at::Tensor& grad_mlp,
                      const at::Tensor& grad_scale) {
  FLEXTRON_DISPATCH_FLOAT(hidden.scalar_type(), "routed_nested_mlp_scale_grad", [&] {
    const scalar_t* scale_ptr = scale.const_data_ptr<scalar_t>();
    scalar_t* gh = grad_hidden.data_ptr<scalar_t>();
    const scalar_t* h = hidden.const_data_ptr<scalar_t>();
    scalar_t* gm = grad_mlp.data_ptr<scalar_t>();
    float* gs = grad_scale.data_ptr<float>();
    const int64_t ld_gh = grad_hidden.stride(0), ld_h = hidden.stride(0);
    const int64_t ld_gm = grad_mlp.stride(0), dim = grad_mlp.size(1);
    for (const Segment& seg : segs) {
      for (int64_t r = seg.begin; r < seg.end; ++r) {
        scalar_t* gh_row = gh + r * ld_gh;
        const scalar_t* h_row = h + r * ld_h;
        float dot = 0.f;
        for (int64_t j = 0; j < seg.width; ++j) {
          dot += static_cast<float>(gh_row[j]) * static_cast<float>(h_row[j]);
        }
        gs[perm[r]] = dot;
        const float s = static_cast<float>(scale_ptr[perm[r]]);
        for (int64_t j = 0; j < seg.width; ++j) {
          gh_row[j] = static_cast<scalar_t>(static_cast<float>(gh_row[j]) * s);
        }
        scalar_t* gm_row = gm + r * ld_gm;
        for (int64_t j = 0; j < dim; ++j) {
          gm_row[j] = static_cast<scalar_t>(static_cast<float>(gm_row[j]) * s);
        }
      }
    }
  });
}

}  // namespace

at::Tensor routed_nested_mlp_cpu(const at::Tensor& x, const std::optional<at::Tensor>& w_gate,
                                 const at::Tensor& w_up, const at::Tensor& w_down,
                                 const at::Tensor& choice, at::IntArrayRef widths,
                                 const std::optional<at::Tensor>& scale,
                                 const std::string& activation) {
  constexpr const char* op = "routed_nested_mlp";
  check_routed_args(op, x, w_gate, w_up, w_down, choice, widths, scale, activation);
  const Routing routing = sort_by_choice(op, choice, static_cast<int64_t>(widths.size()));
  const Activation act = parse_activation(activation);
  const int64_t tokens = x.size(0), hidden_size = x.size(1);
  const at::Tensor scale_x = scale.has_value() ? scale->to(x.scalar_type()).contiguous()
                                               : at::Tensor();  // (T,), as the reference casts it
  const int64_t* perm = routing.perm.const_data_ptr<int64_t>();
  at::Tensor y = at::empty({tokens, hidden_size}, x.options());  // (T, D)

  for_each_tile(tokens, [&](int64_t start, int64_t stop) {
    const int64_t rows = stop - start;
    const std::vector<Segment> segs = segments(routing, widths, start, stop);
    const int64_t width = segs.front().width;  // the tile's widest
    at::Tensor xt = at::empty({rows, hidden_size}, x.options());  // (M, D)
    at::index_select_out(xt, x, 0, routing.perm.narrow(0, start, rows));
    // Zeroed, not empty: a row narrower than the tile leaves columns past its width unwritten,
    // and the GEMMs on its column-prefix views may read past K (bf16 kernels pad K to their
    // vector length): garbage there that happens to be NaN gave NaN outputs.
    const at::Tensor up = at::zeros({rows, width}, x.options());  // (M, W), becomes hidden
    const at::Tensor gate = w_gate.has_value() ? at::zeros({rows, width}, x.options())
                                               : at::Tensor();
    for_each_band(segs, [&](int64_t band_rows, int64_t lo, int64_t hi) {
      band_mm(up, xt, w_up, band_rows, lo, hi);
      if (gate.defined()) band_mm(gate, xt, *w_gate, band_rows, lo, hi);
      activate_(gate.defined() ? block(gate, band_rows, lo, hi) : at::Tensor(),
                block(up, band_rows, lo, hi), act);
    });
    at::Tensor yt = at::empty({rows, hidden_size}, x.options());  // (M, D)
    for (const Segment& seg : segs) {
      linear_nt_out(yt.narrow(0, seg.begin, seg.end - seg.begin),
                    up.narrow(0, seg.begin, seg.end - seg.begin).narrow(1, 0, seg.width),
                    w_down.narrow(1, 0, seg.width));
    }
    scatter_rows(y, yt, perm + start, scale_x);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
routed_nested_mlp_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                               const std::optional<at::Tensor>& w_gate, const at::Tensor& w_up,
                               const at::Tensor& w_down, const at::Tensor& choice,
                               at::IntArrayRef widths, const std::optional<at::Tensor>& scale,
                               const std::string& activation) {
  constexpr const char* op = "routed_nested_mlp_backward";
  check_routed_backward_args(op, grad_out, x, w_gate, w_up, w_down, choice, widths, scale,
                             activation);
  const Routing routing = sort_by_choice(op, choice, static_cast<int64_t>(widths.size()));
  const Activation act = parse_activation(activation);
  const int64_t tokens = x.size(0), hidden_size = x.size(1), max_width = w_up.size(0);
  const std::vector<Segment> all_segs = segments(routing, widths, 0, tokens);
  const int64_t used = all_segs.empty() ? 0 : all_segs.front().width;  // widest width in use
  const at::TensorOptions opts = x.options();
  const at::Tensor scale_x = scale.has_value() ? scale->to(x.scalar_type()).contiguous()
                                               : at::Tensor();  // (T,)
  const int64_t* perm = routing.perm.const_data_ptr<int64_t>();

  // Sorted-order buffers the weight gradients read: x, the gradient of the
  // unscaled MLP output, the hidden activations and the pre-activation gradients.
  const at::Tensor xs = at::empty({tokens, hidden_size}, opts);     // (T, D)
  const at::Tensor grad_mlp = at::empty({tokens, hidden_size}, opts);  // (T, D)
  // Zeroed, not empty: rows narrower than `used` leave columns unwritten that the GEMMs on
  // column-prefix views may read past K (the forward's note): NaN garbage there gave NaN grad_x.
  const at::Tensor hidden = at::zeros({tokens, used}, opts);        // (T, W)
  const at::Tensor up = at::zeros({tokens, used}, opts);            // (T, W): up, then grad_up
  const at::Tensor gate = w_gate.has_value() ? at::zeros({tokens, used}, opts)
                                             : at::Tensor();  // (T, W): gate, then grad_gate
  const at::Tensor grad_x = at::empty({tokens, hidden_size}, opts);  // (T, D)
  const at::Tensor grad_scale_f =
      scale.has_value() ? at::empty({tokens}, opts.dtype(at::kFloat)) : at::Tensor();  // (T,)

  for_each_tile(tokens, [&](int64_t start, int64_t stop) {
    const int64_t rows = stop - start;
    const std::vector<Segment> segs = segments(routing, widths, start, stop);
    const int64_t width = segs.front().width;
    const at::Tensor tile_perm = routing.perm.narrow(0, start, rows);
    at::Tensor xt = xs.narrow(0, start, rows);  // (M, D)
    at::index_select_out(xt, x, 0, tile_perm);
    at::Tensor gt = grad_mlp.narrow(0, start, rows);  // (M, D)
    at::index_select_out(gt, grad_out, 0, tile_perm);
    const at::Tensor ht = hidden.narrow(0, start, rows);
    const at::Tensor ut = up.narrow(0, start, rows);
    const at::Tensor gate_t = gate.defined() ? gate.narrow(0, start, rows) : at::Tensor();
    for_each_band(segs, [&](int64_t band_rows, int64_t lo, int64_t hi) {
      band_mm(ut, xt, w_up, band_rows, lo, hi);
      if (gate_t.defined()) band_mm(gate_t, xt, *w_gate, band_rows, lo, hi);
      activation_out(block(ht, band_rows, lo, hi),
                     gate_t.defined() ? block(gate_t, band_rows, lo, hi) : at::Tensor(),
                     block(ut, band_rows, lo, hi), act);
    });
    const at::Tensor grad_hidden = at::zeros({rows, width}, opts);  // (M, W), zeroed as `up` is
    for (const Segment& seg : segs) {
      at::Tensor out = grad_hidden.narrow(0, seg.begin, seg.end - seg.begin).narrow(1, 0, seg.width);
      at::mm_out(out, gt.narrow(0, seg.begin, seg.end - seg.begin), w_down.narrow(1, 0, seg.width));
    }
    if (scale_x.defined()) {
      apply_scale_grad(segs, perm + start, scale_x, grad_hidden, ht, gt, grad_scale_f);
    }
    for_each_band(segs, [&](int64_t band_rows, int64_t lo, int64_t hi) {
      activation_backward_(gate_t.defined() ? block(gate_t, band_rows, lo, hi) : at::Tensor(),
                           block(ut, band_rows, lo, hi), block(grad_hidden, band_rows, lo, hi),
                           act);
    });
    at::Tensor gxt = at::empty({rows, hidden_size}, opts);  // (M, D)
    for (const Segment& seg : segs) {
      const int64_t n = seg.end - seg.begin;
      at::Tensor out = gxt.narrow(0, seg.begin, n);
      at::mm_out(out, ut.narrow(0, seg.begin, n).narrow(1, 0, seg.width),
                 w_up.narrow(0, 0, seg.width));
      if (gate_t.defined()) {
        out.addmm_(gate_t.narrow(0, seg.begin, n).narrow(1, 0, seg.width),
                   w_gate->narrow(0, 0, seg.width));
      }
    }
    scatter_rows(grad_x, gxt, perm + start, at::Tensor());
  });

  // Weight gradients band by band: disjoint slices, each one large GEMM.
  const at::Tensor grad_w_up = at::empty(w_up.sizes(), opts);      // (F, D)
  const at::Tensor grad_w_down = at::empty(w_down.sizes(), opts);  // (D, F)
  const at::Tensor grad_w_gate = w_gate.has_value() ? at::empty(w_gate->sizes(), opts)
                                                    : at::empty({0}, opts);
  grad_w_up.narrow(0, used, max_width - used).zero_();
  grad_w_down.narrow(1, used, max_width - used).zero_();
  if (w_gate.has_value()) grad_w_gate.narrow(0, used, max_width - used).zero_();
  for_each_band(all_segs, [&](int64_t band_rows, int64_t lo, int64_t hi) {
    const at::Tensor x_rows = xs.narrow(0, 0, band_rows);  // (n, D)
    at::Tensor down_band = grad_w_down.narrow(1, lo, hi - lo);  // (D, band)
    at::mm_out(down_band, grad_mlp.narrow(0, 0, band_rows).t(), block(hidden, band_rows, lo, hi));
    at::Tensor up_band = grad_w_up.narrow(0, lo, hi - lo);  // (band, D)
    at::mm_out(up_band, block(up, band_rows, lo, hi).t(), x_rows);
    if (w_gate.has_value()) {
      at::Tensor gate_band = grad_w_gate.narrow(0, lo, hi - lo);
      at::mm_out(gate_band, block(gate, band_rows, lo, hi).t(), x_rows);
    }
  });
  const at::Tensor grad_scale =
      scale.has_value() ? grad_scale_f.to(scale->scalar_type()) : at::empty({0}, opts);
  return {grad_x, grad_w_gate, grad_w_up, grad_w_down, grad_scale};
}

}  // namespace flextron
