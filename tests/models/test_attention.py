import torch

from yt8m.data import AUDIO_DIM, RGB_DIM
from yt8m.models import build
from yt8m.models.layers import frame_mask

NUM_CLASSES = 5
D = RGB_DIM + AUDIO_DIM


def frames(num_frames, max_frames: int = 6, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    num_frames = torch.as_tensor(num_frames)
    rgb = torch.randn(len(num_frames), max_frames, RGB_DIM, generator=generator)
    audio = torch.randn(len(num_frames), max_frames, AUDIO_DIM, generator=generator)
    padding = ~frame_mask(num_frames, max_frames)
    rgb[padding], audio[padding] = 0.0, 0.0
    return rgb, audio, num_frames


def small(name, **options):
    torch.manual_seed(0)
    return build(name, num_classes=NUM_CLASSES, **options).eval()


def test_attention_weights_sum_to_one_over_the_real_frames_and_are_zero_on_padding():
    num_frames = torch.tensor([6, 2, 0])
    rgb, audio, _ = frames(num_frames)
    mask = frame_mask(num_frames, 6)
    lstm = small("attention_lstm", hidden_size=8, attention_groups=3)
    gru = small("multihop_attention_gru", hidden_size=8, attention_dim=4, num_hops=3)
    with torch.no_grad():
        x = lstm.inputs(rgb, audio)
        weights = [lstm.attention_weights(x, lstm.lstm(x, num_frames, final="output")[0], num_frames),
                   gru.attention_weights(gru.rnn(x, num_frames, final="output")[0], mask)]
    for w in weights:
        assert w.shape == (3, 6, 3)
        torch.testing.assert_close(w.sum(1)[:2], torch.ones(2, 3))
        assert (w[~mask] == 0).all() and (w[2] == 0).all()  # padding, and an empty video's frames


def test_multi_ap_is_the_max_over_groups_of_the_shared_moe_on_hand_pooled_outputs():
    model = small("attention_lstm", hidden_size=8, attention_groups=3, num_mixtures=2)
    rgb, audio, num_frames = frames([6, 4])
    with torch.no_grad():
        x = model.inputs(rgb, audio)
        outputs = model.lstm(x, num_frames, final="output")[0]  # [B, T, H]
        scores = model.attention(torch.cat([x, outputs], -1))  # [B, T, K]: FC([x_t; h_t]) with bias
        expected = []
        for b, n in enumerate(num_frames.tolist()):
            a = torch.softmax(scores[b, :n], 0)  # [n, K]
            pooled = a.t() @ outputs[b, :n]  # [K, H]
            expected.append(model.head.moe(pooled).amax(0))  # one MoE for every group, max of the K
        torch.testing.assert_close(model(rgb, audio, num_frames), torch.stack(expected), rtol=1e-5, atol=1e-5)


def test_local_ap_pools_the_input_frames_next_to_the_final_output():
    model = small("attention_lstm", pooling="local", hidden_size=8, attention_groups=1, num_mixtures=2)
    rgb, audio, num_frames = frames([6, 3])
    with torch.no_grad():
        x = model.inputs(rgb, audio)
        outputs, final = model.lstm(x, num_frames, final="output")
        torch.testing.assert_close(final, outputs[torch.arange(2), num_frames - 1])
        a = model.attention_weights(x, outputs, num_frames)  # [B, T, 1]
        expected = model.head(torch.cat([final, (a * x).sum(1)], -1))  # Eq. 5: MoE([y_T; sum_t a_t x_t])
        torch.testing.assert_close(model(rgb, audio, num_frames), expected)


def test_the_positional_embedding_reaches_only_the_attention_net():
    model = small("attention_lstm", hidden_size=8, attention_groups=2, positional_dim=4, max_positions=4)
    assert model.attention.in_features == D + 4 + D + 8  # [x_t; P_t; mean_x; h_t]
    rgb, audio, num_frames = frames([6, 3])  # 6 frames > max_positions: the last row serves frames 3..5
    seen = {}
    model.lstm.register_forward_hook(lambda module, args, out: seen.update(lstm_in=args[0], lstm_out=out[0]))
    model.attention.register_forward_hook(lambda module, args, out: seen.update(attention_in=args[0]))
    with torch.no_grad():
        model(rgb, audio, num_frames)
        x = model.inputs(rgb, audio)
        torch.testing.assert_close(seen["lstm_in"], x)  # the raw frames, no embedding
        mean = torch.stack([x[b, :n].mean(0) for b, n in enumerate(num_frames.tolist())])
        positions = model.positional[torch.tensor([0, 1, 2, 3, 3, 3])]
        expected = torch.cat([x, positions.expand(2, -1, -1), mean[:, None].expand(-1, 6, -1), seen["lstm_out"]], -1)
        torch.testing.assert_close(seen["attention_in"], expected)
        before = seen["lstm_out"]
        model.positional.add_(1.0)
        model(rgb, audio, num_frames)
        torch.testing.assert_close(seen["lstm_out"], before)  # the LSTM does not see it


def test_second_lstm_feeds_the_attention_net_and_the_first_is_pooled():
    model = small("attention_lstm", attention_source="second_lstm", hidden_size=8, attention_groups=2)
    rgb, audio, num_frames = frames([5, 2])
    with torch.no_grad():
        x = model.inputs(rgb, audio)
        pooled_outputs = model.lstm(x, num_frames, final="output")[0]
        attention_states = model.attention_lstm(x, num_frames, final="output")[0]
        weights = torch.softmax(model.attention(torch.cat([x, attention_states], -1))
                                .masked_fill(~frame_mask(num_frames, 6)[..., None], float("-inf")), 1)
        expected = model.head(torch.einsum("btk,bth->bkh", weights, pooled_outputs))
        torch.testing.assert_close(model(rgb, audio, num_frames), expected, rtol=1e-5, atol=1e-5)


def test_attention_vlad_kernel_residuals_and_constraint_follow_the_equations():
    model = small("attention_vlad", num_clusters=3, attention_dim=4, constraint_weight=0.5, num_mixtures=2)
    pool = model.pool
    rgb, audio, num_frames = frames([4, 2], max_frames=4)
    with torch.no_grad():
        x = model.inputs(rgb, audio)
        features, constraint = pool(x, frame_mask(num_frames, 4))
        for b, n in enumerate(num_frames.tolist()):
            xs, centers = x[b, :n], pool.cluster_centers
            scores = torch.stack([torch.stack([pool.score.weight[0] @ torch.tanh(
                pool.center_proj.weight @ centers[j] + pool.frame_proj.weight @ xs[i] + pool.frame_proj.bias)
                for j in range(3)]) for i in range(n)])  # Eq. 7: w_a^T tanh(W_c C_j + W_i x_i + b)
            a = torch.softmax(scores, 1)  # scheme (a): over the centres
            torch.testing.assert_close(pool.assignment(x[b:b + 1], frame_mask(num_frames[b:b + 1], 4))[0, :n], a)
            residuals = torch.stack([(a[:, j, None] * (xs - centers[j])).sum(0) for j in range(3)])  # Eq. 4
            normalized = torch.nn.functional.normalize(residuals, dim=1).flatten()
            torch.testing.assert_close(features[b], normalized / normalized.norm())
            expected = sum(a[i, j] * (xs[i] - centers[j]).square().sum() for i in range(n) for j in range(3))
            torch.testing.assert_close(constraint[b], expected)
        model.train()
        out = model(rgb, audio, num_frames)
        torch.testing.assert_close(out["extra_loss"], 0.5 * constraint.mean())
        torch.testing.assert_close(out["logits"], model.head(features))


def test_attention_vlad_scheme_b_normalises_over_the_real_frames():
    pool = small("attention_vlad", num_clusters=3, attention_dim=4, normalize_over="frames").pool
    num_frames = torch.tensor([4, 2])
    mask = frame_mask(num_frames, 4)
    with torch.no_grad():
        a = pool.assignment(torch.randn(2, 4, D), mask)
    torch.testing.assert_close(a.sum(1), torch.ones(2, 3))
    assert (a[~mask] == 0).all()


def test_multihop_pooling_is_the_formula():
    model = small("multihop_attention_gru", hidden_size=8, attention_dim=4, num_hops=3)
    rgb, audio, num_frames = frames([6, 3])
    with torch.no_grad():
        x = model.inputs(rgb, audio)
        h = model.rnn(x, num_frames, final="output")[0]
        features = model.forward_features(rgb, audio, num_frames)
        for b, n in enumerate(num_frames.tolist()):
            hs = h[b, :n]  # H [n, N]
            weights = torch.softmax(model.hops.weight @ torch.tanh(model.projection.weight @ hs.t()), dim=1)  # [hops, n]
            torch.testing.assert_close(features[b], (weights @ hs).flatten())  # Eq. 3


def test_parameter_counts_at_paper_sizes():
    def count(name, **options):
        with torch.device("meta"):
            return sum(p.numel() for p in build(name, num_classes=4716, **options).parameters())

    lstm = 4 * 1024 * (D + 1024 + 2) + 4 * 1024 * (2048 + 2)  # 2 x 1024 (PyTorch's two bias vectors)
    moe = lambda dim, m: 4716 * (m + 1) * dim + 4716 * m * (dim + 1)  # noqa: E731
    assert count("attention_lstm") == lstm + (D + 1024 + 1) * 8 + moe(1024, 4)  # row 25
    assert count("attention_lstm", positional_dim=32, num_mixtures=8) == \
        lstm + 300 * 32 + (2 * D + 32 + 1024 + 1) * 8 + moe(1024, 8)  # row 27
    assert count("attention_lstm", pooling="local", attention_groups=1) == \
        lstm + (D + 1024 + 1) + moe(1024 + D, 4)  # row 23
    assert count("attention_vlad") == 10 * D + 256 * D + (D + 1) * 256 + 256 + moe(10 * D, 2)
