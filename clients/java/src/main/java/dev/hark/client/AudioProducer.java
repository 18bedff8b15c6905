package dev.hark.client;

import io.apicurio.registry.serde.avro.AvroKafkaSerializer;
import java.io.File;
import java.io.FileInputStream;
import java.io.InputStream;
import java.net.URI;
import java.net.URLEncoder;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.Future;
import javax.sound.sampled.AudioFormat;
import javax.sound.sampled.AudioInputStream;
import javax.sound.sampled.AudioSystem;
import org.apache.avro.Schema;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericRecord;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.KafkaException;
import org.apache.kafka.common.serialization.StringSerializer;

/**
 * Publishes a 16-bit mono WAV file as one stream on a tenant's produce topic: StreamStart, an
 * AudioChunk per 200 ms, StreamEnd, keyed by the stream id. Nothing here knows hark beyond its
 * schemas' names: the producer is Apache Kafka's (idempotent), the value serializer Apicurio's,
 * writing Confluent framing (magic 0, 4-byte content id, no headers). The schemas are hark's as
 * registered, read from the registry named in the properties file; the serializer finds each one
 * by its record's full name and registers nothing (the registry refuses anonymous writes).
 *
 * <p>Usage: AudioProducer CONFIG.properties TOPIC FILE.wav STREAM_ID. CONFIG holds ordinary
 * producer properties (bootstrap.servers, the SASL login) and the apicurio.registry.* settings; it
 * is a file so that the password never shows in a process list. Exits non-zero, the error on
 * stderr, unless the broker acknowledged every record.
 */
public final class AudioProducer {
    private AudioProducer() {}

    public static void main(String[] args) throws Exception {
        if (args.length != 4) {
            System.err.println("usage: AudioProducer CONFIG.properties TOPIC FILE.wav STREAM_ID");
            System.exit(2);
        }
        Properties props = new Properties();
        try (InputStream in = new FileInputStream(args[0])) {
            props.load(in);
        }
        String topic = args[1];
        String wavFile = args[2];
        String streamId = args[3];

        AudioFormat format;
        byte[] pcm;
        try (AudioInputStream wav = AudioSystem.getAudioInputStream(new File(wavFile))) {
            format = wav.getFormat();
            pcm = wav.readAllBytes();
        }
        if (format.getChannels() != 1 || format.getSampleSizeInBits() != 16 || format.isBigEndian()
                || format.getEncoding() != AudioFormat.Encoding.PCM_SIGNED) {
            System.err.println(wavFile + ": not 16-bit mono PCM: " + format);
            System.exit(2);
        }
        int rate = Math.round(format.getSampleRate());

        // hark's schemas as registered (subject = the record's full name), read anonymously
        String registry = props.getProperty("apicurio.registry.url");
        Schema start = schema(registry, "hark.StreamStart");
        Schema chunk = schema(registry, "hark.AudioChunk");
        Schema end = schema(registry, "hark.StreamEnd");

        props.putIfAbsent(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
        props.putIfAbsent(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, AvroKafkaSerializer.class.getName());
        props.put(ProducerConfig.ENABLE_IDEMPOTENCE_CONFIG, "true"); // a retried send is not a second chunk
        props.put(ProducerConfig.ACKS_CONFIG, "all");

        List<Future<RecordMetadata>> sent = new ArrayList<>();
        long chunks = 0;
        try (KafkaProducer<String, GenericRecord> producer = new KafkaProducer<>(props)) {
            long now = System.currentTimeMillis();
            GenericRecord s = record(start, streamId, 0);
            s.put("source_format", "wav");
            s.put("source_name", wavFile);
            s.put("sample_rate", rate);
            s.put("source_sample_rate", rate);
            s.put("source_channels", 1);
            s.put("started_at_ms", now);
            sent.add(producer.send(new ProducerRecord<>(topic, streamId, s)));

            int step = rate / 5 * 2; // 200 ms of audio a record
            for (int at = 0; at < pcm.length; at += step) {
                GenericRecord c = record(chunk, streamId, ++chunks);
                c.put("offset_samples", (long) at / 2);
                c.put("sample_rate", rate);
                c.put("pcm", ByteBuffer.wrap(Arrays.copyOfRange(pcm, at, Math.min(at + step, pcm.length))));
                c.put("published_at_ms", System.currentTimeMillis());
                sent.add(producer.send(new ProducerRecord<>(topic, streamId, c)));
            }

            GenericRecord e = record(end, streamId, chunks + 1);
            e.put("total_samples", (long) pcm.length / 2);
            e.put("status", new GenericData.EnumSymbol(end.getField("status").schema(), "COMPLETE"));
            e.put("ended_at_ms", System.currentTimeMillis());
            sent.add(producer.send(new ProducerRecord<>(topic, streamId, e)));
            producer.flush();
            for (Future<RecordMetadata> f : sent) {
                f.get(); // throws what the broker (or the serializer) refused
            }
        } catch (ExecutionException failed) { // the broker refused a record
            System.err.println(streamId + ": not published: " + failed.getCause());
            System.exit(1);
        } catch (KafkaException failed) { // refused before it was sent: the topic, the schema
            System.err.println(streamId + ": not published: " + failed);
            System.exit(1);
        }
        System.out.println(streamId + " published: " + chunks + " chunks");
    }

    /** A record of {@code schema} with the fields every hark record has; the others take defaults. */
    private static GenericRecord record(Schema schema, String streamId, long seq) {
        GenericRecord r = new GenericData.Record(schema);
        for (Schema.Field f : schema.getFields()) {
            if (f.hasDefaultValue()) {
                r.put(f.pos(), GenericData.get().getDefaultValue(f));
            }
        }
        r.put("stream_id", streamId);
        r.put("tenant", ""); // ingest takes the tenant from the topic
        r.put("seq", seq);
        return r;
    }

    /** The latest version of an artifact in the registry's default group (its ccompat subject). */
    private static Schema schema(String registry, String name) throws Exception {
        URI uri = URI.create(registry + "/groups/default/artifacts/"
                + URLEncoder.encode(name, StandardCharsets.UTF_8) + "/versions/branch=latest/content");
        HttpResponse<String> got = HttpClient.newHttpClient()
                .send(HttpRequest.newBuilder(uri).GET().build(), HttpResponse.BodyHandlers.ofString());
        if (got.statusCode() != 200) {
            throw new IllegalStateException(uri + ": HTTP " + got.statusCode() + ": " + got.body());
        }
        return new Schema.Parser().parse(got.body());
    }
}
