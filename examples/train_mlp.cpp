// train_mlp: the smallest end-to-end use of rex. A 2-hidden-layer MLP learns the synthetic
// regression y = sin(2 x0) x1 + 0.5 x2^2 - 0.3 x3 from 4096 random points, with minibatch SGD +
// momentum written out by hand, so that the whole training loop is on one page (rex::optim has
// AdamW for real models). Prints train and held-out MSE as it goes.
//
//   train_mlp [--steps N] [--batch B] [--hidden H] [--lr LR] [--seed S]
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <rex/rex.hpp>

namespace {

struct Options {
  int steps = 3000;
  int batch = 128;
  int hidden = 64;
  float lr = 0.05f;
  uint64_t seed = 0;
};

const char* kUsage =
    "usage: train_mlp [--steps N] [--batch B] [--hidden H] [--lr LR] [--seed S]\n"
    "  --steps N    SGD steps (default 3000)\n"
    "  --batch B    minibatch size (default 128)\n"
    "  --hidden H   width of both hidden layers (default 64)\n"
    "  --lr LR      learning rate for SGD with momentum 0.9 (default 0.05)\n"
    "  --seed S     seed for data, initialisation and batches (default 0)\n";

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      std::printf("%s", kUsage);
      std::exit(0);
    }
    REX_CHECK(i + 1 < argc, "train_mlp: ", flag, " needs a value\n", kUsage);
    const std::string value = argv[++i];
    char* end = nullptr;
    const double number = std::strtod(value.c_str(), &end);
    REX_CHECK(end && *end == '\0', "train_mlp: ", flag, " expects a number, got '", value, "'");
    if (flag == "--steps") {
      o.steps = static_cast<int>(number);
    } else if (flag == "--batch") {
      o.batch = static_cast<int>(number);
    } else if (flag == "--hidden") {
      o.hidden = static_cast<int>(number);
    } else if (flag == "--lr") {
      o.lr = static_cast<float>(number);
    } else if (flag == "--seed") {
      o.seed = static_cast<uint64_t>(number);
    } else {
      throw rex::Error("train_mlp: unknown flag " + flag + "\n" + kUsage);
    }
  }
  REX_CHECK(o.steps > 0 && o.batch > 0 && o.hidden > 0 && o.lr > 0, "train_mlp: --steps, --batch, ",
            "--hidden and --lr must be positive");
  return o;
}

float target(const float* x) {
  return std::sin(2.0f * x[0]) * x[1] + 0.5f * x[2] * x[2] - 0.3f * x[3];
}

struct Mlp {
  std::vector<rex::Tensor> params;  // w1, b1, w2, b2, w3, b3

  Mlp(int in, int hidden, rex::Generator& gen) {
    auto layer = [&](int fan_in, int fan_out) {
      const float bound = 1.0f / std::sqrt(static_cast<float>(fan_in));
      params.push_back(rex::uniform({fan_in, fan_out}, gen, -bound, bound).requires_grad_());
      params.push_back(rex::zeros({fan_out}).requires_grad_());
    };
    layer(in, hidden);
    layer(hidden, hidden);
    layer(hidden, 1);
  }

  rex::Tensor forward(const rex::Tensor& x) const {
    rex::Tensor h = rex::tanh(rex::matmul(x, params[0]) + params[1]);
    h = rex::tanh(rex::matmul(h, params[2]) + params[3]);
    return rex::matmul(h, params[4]) + params[5];
  }
};

rex::Tensor mse(const rex::Tensor& prediction, const rex::Tensor& y) {
  rex::Tensor diff = prediction - y;
  return rex::mean(diff * diff);
}

}  // namespace

int main(int argc, char** argv) try {
  const Options opt = parse(argc, argv);
  rex::Generator gen(opt.seed);

  const int64_t n_train = 4096, n_test = 1024, features = 4;
  rex::Tensor x_all = rex::uniform({n_train + n_test, features}, gen, -1.0f, 1.0f);
  rex::Tensor y_all = rex::Tensor::empty({n_train + n_test, 1});
  for (int64_t i = 0; i < n_train + n_test; ++i)
    y_all.data<float>()[i] = target(x_all.data<float>() + i * features);
  const rex::Tensor x_test = rex::slice(x_all, 0, n_train, n_train + n_test);
  const rex::Tensor y_test = rex::slice(y_all, 0, n_train, n_train + n_test);

  Mlp model(features, opt.hidden, gen);
  std::vector<rex::Tensor> velocity;
  for (const rex::Tensor& p : model.params) velocity.push_back(rex::zeros(p.shape()));

  std::printf("train_mlp: 4 -> %d -> %d -> 1, %lld train / %lld held-out points, %d steps\n",
              opt.hidden, opt.hidden, static_cast<long long>(n_train),
              static_cast<long long>(n_test), opt.steps);
  for (int step = 1; step <= opt.steps; ++step) {
    std::vector<int32_t> rows(static_cast<size_t>(opt.batch));
    for (int32_t& r : rows) r = static_cast<int32_t>(gen.below(n_train));
    const rex::Tensor index = rex::from_vector(rows);
    rex::Tensor loss =
        mse(model.forward(rex::gather_rows(x_all, index)), rex::gather_rows(y_all, index));
    for (rex::Tensor& p : model.params) p.zero_grad();
    loss.backward();

    for (size_t k = 0; k < model.params.size(); ++k) {  // SGD with momentum 0.9
      float* w = model.params[k].data<float>();
      float* v = velocity[k].data<float>();
      const float* g = model.params[k].grad().data<float>();
      for (int64_t i = 0; i < model.params[k].numel(); ++i) {
        v[i] = 0.9f * v[i] + g[i];
        w[i] -= opt.lr * v[i];
      }
    }
    if (step == 1 || step % 250 == 0 || step == opt.steps) {
      rex::NoGradGuard no_grad;
      std::printf("step %5d  train mse %.5f  held-out mse %.5f\n", step, loss.item(),
                  mse(model.forward(x_test), y_test).item());
    }
  }
  return 0;
} catch (const rex::Error& e) {
  std::fprintf(stderr, "error: %s\n", e.what());
  return 1;
}
